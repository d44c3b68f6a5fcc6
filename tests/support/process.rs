//! The kernel's own figures for this process, read the way a person would check them.
#![allow(dead_code)]

/// A `Name:  N kB` field of `/proc/self/status`, in bytes.
pub fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// VmRSS in bytes.
pub fn vm_rss() -> u64 {
    status_kb("VmRSS")
}

/// jemalloc's stats read directly, after advancing its epoch: (allocated, resident).
pub fn jemalloc_allocated_resident() -> (u64, u64) {
    tikv_jemalloc_ctl::epoch::advance().expect("epoch");
    (
        tikv_jemalloc_ctl::stats::allocated::read().expect("allocated") as u64,
        tikv_jemalloc_ctl::stats::resident::read().expect("resident") as u64,
    )
}

pub const MIB: f64 = 1_048_576.0;

/// |a - b| / b
pub fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Asserts `value` (bytes) lies within 10 % of the range of VmRSS read before and
/// after it was taken: RSS moves while a request runs (allocator purges, new threads).
pub fn assert_within_rss(value: f64, rss_before: u64, rss_after: u64) {
    let low = rss_before.min(rss_after) as f64 * 0.9;
    let high = rss_before.max(rss_after) as f64 * 1.1;
    assert!(
        low <= value && value <= high,
        "{value} vs VmRSS {rss_before}..{rss_after}"
    );
}
