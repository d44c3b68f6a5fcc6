//! Peak resident set size of this process image, exact and cheap.
//!
//! `getrusage(RUSAGE_SELF).ru_maxrss` is one cheap syscall, but the kernel carries it
//! across `execve`: a process started by a large parent reports the parent's peak.
//! `VmHWM` in `/proc/self/status` is exact for this image but costs a whole status
//! read and parse. At start we note both. The kernel keeps
//! `ru_maxrss = max(inherited, this image's high-water mark)`, so once `ru_maxrss`
//! rises above its start value it *is* this image's peak; only while it has not
//! moved and the start value was inherited do we read `VmHWM` — and then only
//! `VmHWM`: once it passes the inherited value, `ru_maxrss` is exact for good.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use super::{parse_kb_field, ProcFile};

#[derive(Debug)]
pub(crate) struct Peak {
    /// `ru_maxrss` at start, bytes.
    start_maxrss: u64,
    /// Whether the start value came from a parent image (above this image's VmHWM)
    /// and this image's peak has not passed it yet.
    inherited: AtomicBool,
    status: Option<ProcFile>,
}

impl Peak {
    pub(crate) fn open() -> Option<Self> {
        let start_maxrss = maxrss_bytes()?;
        let status = ProcFile::open("/proc/self/status");
        let hwm = status.as_ref().and_then(read_hwm);
        Some(Self {
            start_maxrss,
            inherited: AtomicBool::new(hwm.is_some_and(|hwm| start_maxrss > hwm)),
            status,
        })
    }

    pub(crate) fn read(&self) -> Option<u64> {
        if self.inherited.load(Relaxed) {
            if let Some(hwm) = self.status.as_ref().and_then(read_hwm) {
                if hwm <= self.start_maxrss {
                    return Some(hwm);
                }
                // This image's own peak is now above the inherited one: from here on
                // ru_maxrss is max(inherited, ours) = ours.
                self.inherited.store(false, Relaxed);
            }
        }
        maxrss_bytes()
    }
}

fn read_hwm(status: &ProcFile) -> Option<u64> {
    // /proc/self/status is about 1.5 KiB; 4 KiB leaves room for long group lists
    // (a larger file reads as None: the caller falls back to ru_maxrss).
    let mut buf = [0u8; 4096];
    parse_kb_field(status.read_into(&mut buf)?, b"VmHWM")
}

/// `ru_maxrss` in bytes (Linux reports KiB).
#[cfg(target_os = "linux")]
pub(crate) fn maxrss_bytes() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole rusage into the pointer on success.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: rc == 0, so the struct was written.
    let kib = unsafe { usage.assume_init() }.ru_maxrss;
    u64::try_from(kib).ok()?.checked_mul(1024)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn maxrss_bytes() -> Option<u64> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn peak_matches_vm_hwm() {
        let peak = Peak::open().unwrap();
        let before = std::fs::read("/proc/self/status").unwrap();
        let got = peak.read().unwrap();
        let after = std::fs::read("/proc/self/status").unwrap();
        let lo = parse_kb_field(&before, b"VmHWM").unwrap();
        let hi = parse_kb_field(&after, b"VmHWM").unwrap();
        // The kernel keeps RSS in per-CPU counters and the two reads sum them separately
        // (approximately): while other test threads fault pages in, they may differ by a
        // few pages per CPU.
        let slack = 64 * 4096 * std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        assert!(
            lo.saturating_sub(slack) <= got && got <= hi + slack,
            "{lo} <= {got} <= {hi}"
        );
    }
}
