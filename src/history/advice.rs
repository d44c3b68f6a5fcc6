//! Recommendations drawn from measured facts only; each names the figure behind it.

use crate::snapshot::Snapshot;

use super::Trends;

const MIB: f64 = 1_048_576.0;

/// jemalloc holding this much resident memory beyond what is allocated and active...
const HELD_MIN_BYTES: u64 = 64 << 20;
/// ... and this fraction of what is allocated, is worth a purge.
const HELD_MIN_FRACTION: f64 = 0.25;
/// Pressure episodes in a window worth a word.
const EPISODES_MIN: u32 = 3;
/// A cleanup run that frees less than this on average freed little.
const CLEANUP_LITTLE_BYTES: f64 = 1_048_576.0;

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / MIB)
}

fn hours(secs: f64) -> String {
    if secs < 3600.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

/// jemalloc's pools, read for the fragmentation recommendation.
#[cfg(feature = "jemalloc")]
pub(crate) type Pools = Vec<crate::source::pools::ArenaPool>;
/// Without jemalloc there are no pools to read.
#[cfg(not(feature = "jemalloc"))]
pub(crate) type Pools = Vec<()>;

/// Fragmentation (jemalloc resident ÷ allocated) above which the worst classes are named.
#[cfg(feature = "jemalloc")]
const FRAGMENTED: f64 = 1.5;

/// The recommendations for `trends` and the current snapshot `snap`; `pools` are read
/// (when jemalloc's are available) only if fragmentation is high.
pub(crate) fn recommendations(trends: &Trends, snap: &Snapshot, pools: impl FnOnce() -> Option<Pools>) -> Vec<String> {
    let mut out = Vec::new();
    let window = hours(trends.window.as_secs_f64());
    let to_limit = |rate: f64| -> Option<String> {
        let (usage, limit) = (trends.usage_bytes?, trends.limit_bytes?);
        (rate > 0.0).then(|| hours(limit.saturating_sub(usage) as f64 / rate))
    };
    for c in trends.components.iter().filter(|c| c.leak_suspected()) {
        let rate = c.growth.rate_bytes_per_sec;
        let limit = to_limit(rate).map_or(String::new(), |t| {
            format!(
                ", which alone would reach the limit ({}) in {t}",
                mb(trends.limit_bytes.unwrap_or(0) as f64)
            )
        });
        out.push(format!(
            "Component `{}` is suspected of leaking: its floor grew {}/h over the last {window} (Mann-Kendall Z {:.1}, now {}){limit}. Look for what it keeps and never evicts.",
            c.name,
            mb(rate * 3600.0),
            c.growth.z,
            mb(c.bytes.unwrap_or(0) as f64),
        ));
    }
    if let Some(ttl) = trends.time_to_limit.filter(|d| d.as_secs_f64() < 24.0 * 3600.0) {
        out.push(format!(
            "At the current growth of resident memory ({}/h over the last {window}) the limit of {} is reached in {}: less than a day.",
            mb(trends.growth.rate_bytes_per_sec * 3600.0),
            mb(trends.limit_bytes.unwrap_or(0) as f64),
            hours(ttl.as_secs_f64()),
        ));
    }
    if let Some(j) = snap.jemalloc {
        let held = j.resident.saturating_sub(j.active).saturating_sub(j.metadata);
        if held >= HELD_MIN_BYTES && held as f64 >= HELD_MIN_FRACTION * j.allocated as f64 {
            out.push(format!(
                "jemalloc holds {} of freed pages (resident {} − active {} − metadata {}) against {} allocated: a purge (memtel::purge_jemalloc, or the GC trigger) would return about {} to the kernel.",
                mb(held as f64),
                mb(j.resident as f64),
                mb(j.active as f64),
                mb(j.metadata as f64),
                mb(j.allocated as f64),
                mb(held as f64),
            ));
        }
    }
    #[cfg(not(feature = "jemalloc"))]
    drop(pools);
    #[cfg(feature = "jemalloc")]
    if let Some(j) = snap.jemalloc {
        let ratio = j.fragmentation_ratio().unwrap_or(0.0);
        if ratio >= FRAGMENTED && j.resident.saturating_sub(j.allocated) >= HELD_MIN_BYTES {
            if let Some(pools) = pools() {
                let mut classes: Vec<(u64, &crate::source::pools::ArenaPool, &crate::source::pools::ClassPool)> = pools
                    .iter()
                    .flat_map(|a| {
                        a.classes
                            .iter()
                            .map(move |c| (c.held_bytes.saturating_sub(c.live_bytes), a, c))
                    })
                    .filter(|(waste, _, c)| *waste > 0 && c.held_bytes >= 2 * c.live_bytes)
                    .collect();
                classes.sort_by_key(|c| std::cmp::Reverse(c.0));
                let worst: Vec<String> = classes
                    .iter()
                    .take(3)
                    .map(|(_, a, c)| {
                        format!(
                            "{} B in arena {}{} ({} held in slabs for {} live, {:.0} % used)",
                            c.size,
                            a.index,
                            a.component.map_or(String::new(), |n| format!(" (component `{n}`)")),
                            mb(c.held_bytes as f64),
                            mb(c.live_bytes as f64),
                            c.utilization * 100.0
                        )
                    })
                    .collect();
                if !worst.is_empty() {
                    out.push(format!(
                        "Memory is fragmented (jemalloc resident {} for {} allocated, {ratio:.2}×); the worst size classes: {}. Long-lived allocations scattered among short-lived ones of the same size keep slabs alive.",
                        mb(j.resident as f64),
                        mb(j.allocated as f64),
                        worst.join("; ")
                    ));
                }
            }
        }
    }
    if trends.pressure_episodes >= EPISODES_MIN {
        out.push(format!(
            "Memory pressure rose above normal {} times in the last {window} (peak RSS {} of the {} limit): raise the limit or shrink what the components keep.",
            trends.pressure_episodes,
            mb(trends.peak_bytes.unwrap_or(0) as f64),
            mb(trends.limit_bytes.unwrap_or(0) as f64),
        ));
    }
    let runs = snap.actions.cleanup_runs;
    if runs > 0 {
        let per_run = snap.actions.cleanup_freed_bytes as f64 / runs as f64;
        if per_run < CLEANUP_LITTLE_BYTES {
            out.push(format!(
                "Cleanup hooks ran {runs} times and freed {} in all ({} per run): they release little; register hooks that drop what the growing components keep.",
                mb(snap.actions.cleanup_freed_bytes as f64),
                mb(per_run),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::history::leak::Assessment;
    use crate::history::{ComponentTrend, Trends};
    use crate::snapshot::JemallocStats;

    const MB: u64 = 1 << 20;

    fn quiet() -> Assessment {
        Assessment {
            rate_bytes_per_sec: 0.0,
            sustained_growth: false,
            since: None,
            z: 0.0,
            fit: 0.0,
        }
    }

    fn trends() -> Trends {
        Trends {
            window: Duration::from_secs(3600),
            samples: 360,
            growth: quiet(),
            usage_bytes: Some(500 * MB),
            limit_bytes: Some(2048 * MB),
            time_to_limit: None,
            components: vec![ComponentTrend {
                name: "cache".into(),
                growth: quiet(),
                bytes: Some(100 * MB),
            }],
            pressure_episodes: 0,
            peak_bytes: Some(600 * MB),
            first_sample: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut snap = (*crate::MemoryMonitor::new().snapshot()).clone();
        snap.jemalloc = None;
        snap.actions = Default::default();
        snap
    }

    #[test]
    fn nothing_measured_nothing_advised() {
        assert_eq!(recommendations(&trends(), &snapshot(), || None), Vec::<String>::new());
    }

    #[test]
    fn a_suspected_leak_names_component_rate_and_time_to_limit() {
        let mut t = trends();
        t.components[0].growth = Assessment {
            rate_bytes_per_sec: 10.0 * MB as f64 / 3600.0,
            sustained_growth: true,
            since: Some(0.0),
            z: 4.2,
            fit: 0.9,
        };
        let advice = recommendations(&t, &snapshot(), || None);
        assert_eq!(advice.len(), 1, "{advice:?}");
        // (2048 − 500) MB at 10 MB/h: 154.8 h.
        for figure in ["`cache`", "10.0 MB/h", "Z 4.2", "100.0 MB", "154.8 h"] {
            assert!(advice[0].contains(figure), "{figure} in {advice:?}");
        }
    }

    #[test]
    fn the_limit_within_a_day_is_said_with_its_rate() {
        let mut t = trends();
        t.growth.rate_bytes_per_sec = 100.0 * MB as f64 / 3600.0;
        t.time_to_limit = Some(Duration::from_secs(15 * 3600));
        let advice = recommendations(&t, &snapshot(), || None);
        assert!(
            advice.iter().any(|a| a.contains("100.0 MB/h") && a.contains("15.0 h")),
            "{advice:?}"
        );
        t.time_to_limit = Some(Duration::from_secs(30 * 3600));
        assert!(recommendations(&t, &snapshot(), || None).is_empty());
    }

    #[test]
    fn freed_pages_jemalloc_holds_are_named_with_what_a_purge_returns() {
        let mut snap = snapshot();
        let stats = |resident: u64| JemallocStats {
            allocated: 250 * MB,
            active: 300 * MB,
            resident,
            metadata: 20 * MB,
            mapped: 700 * MB,
            retained: 0,
            age: Duration::ZERO,
        };
        snap.jemalloc = Some(stats(600 * MB));
        let advice = recommendations(&trends(), &snap, || None);
        assert_eq!(advice.len(), 1, "{advice:?}");
        // 600 − 300 − 20 = 280 MB held.
        assert!(
            advice[0].contains("280.0 MB") && advice[0].contains("purge"),
            "{advice:?}"
        );
        // 40 MB held: below 64 MB, nothing said.
        snap.jemalloc = Some(stats(360 * MB));
        assert!(recommendations(&trends(), &snap, || None).is_empty());
    }

    #[test]
    fn repeated_pressure_and_idle_cleanups_are_counted() {
        let mut t = trends();
        t.pressure_episodes = 3;
        let mut snap = snapshot();
        snap.actions.cleanup_runs = 4;
        snap.actions.cleanup_freed_bytes = MB;
        let advice = recommendations(&t, &snap, || None);
        assert_eq!(advice.len(), 2, "{advice:?}");
        assert!(
            advice[0].contains("3 times") && advice[0].contains("600.0 MB"),
            "{advice:?}"
        );
        assert!(
            advice[1].contains("4 times") && advice[1].contains("0.2 MB per run"),
            "{advice:?}"
        );
        t.pressure_episodes = 2;
        snap.actions.cleanup_freed_bytes = 40 * MB;
        assert!(recommendations(&t, &snap, || None).is_empty());
    }
}
