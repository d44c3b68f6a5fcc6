//! The limit the kernel will enforce and the kernel's own pressure signals, read
//! together on a schedule (they change rarely, and reading them walks several files).

use std::path::Path;
use std::sync::Arc;

use super::cgroup::{Cgroup, Read, Version};
use super::{parse_kb_field, psi};
use crate::snapshot::{CgroupSignals, KernelSignals, Limit, LimitSource, PsiSource};

/// What one refresh read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KernelReading {
    pub(crate) limit: Option<Limit>,
    pub(crate) signals: Arc<KernelSignals>,
}

/// Reads the live system.
pub(crate) fn read_live(cgroup: Option<&Cgroup>, configured: Option<u64>) -> KernelReading {
    read_with(&|path: &Path| std::fs::read_to_string(path).ok(), cgroup, configured)
}

/// The process's memory cgroup on the live system.
pub(crate) fn discover_live() -> Option<Cgroup> {
    Cgroup::discover(&|path: &Path| std::fs::read_to_string(path).ok())
}

/// The effective limit — explicit, else the cgroup's when below physical RAM, else
/// physical RAM — and the kernel's signals, through any reader.
pub(crate) fn read_with(read: Read<'_>, cgroup: Option<&Cgroup>, configured: Option<u64>) -> KernelReading {
    let cgroup_limit = cgroup.and_then(|cg| cg.limit(read));
    let limit = match configured {
        Some(bytes) => Some(Limit::new(bytes, LimitSource::Configured)),
        None => {
            let ram = read(Path::new("/proc/meminfo")).and_then(|t| parse_kb_field(t.as_bytes(), b"MemTotal"));
            match (cgroup_limit, ram) {
                // A cgroup limit above physical RAM is no limit: RAM runs out first.
                (Some(c), Some(r)) if c < r => Some(Limit::new(c, LimitSource::Cgroup)),
                (Some(c), None) => Some(Limit::new(c, LimitSource::Cgroup)),
                (_, Some(r)) => Some(Limit::new(r, LimitSource::System)),
                (None, None) => None,
            }
        }
    };
    let cgroup_psi = cgroup
        .and_then(Cgroup::pressure_file)
        .and_then(|file| read(&file))
        .and_then(|t| psi::parse(&t));
    let (psi, psi_source) = match cgroup_psi {
        Some(p) => (Some(p), Some(PsiSource::Cgroup)),
        None => match read(Path::new("/proc/pressure/memory")).and_then(|t| psi::parse(&t)) {
            Some(p) => (Some(p), Some(PsiSource::System)),
            None => (None, None),
        },
    };
    let cgroup = cgroup.map(|cg| CgroupSignals {
        version: match cg.version {
            Version::V1 => 1,
            Version::V2 => 2,
        },
        path: cg.path.clone(),
        limit_bytes: cgroup_limit,
        high_bytes: cg.high(read),
        events: cg.events(read),
    });
    KernelReading {
        limit,
        signals: Arc::new(KernelSignals {
            psi,
            psi_source,
            cgroup,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    const MOUNTINFO: &str = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:        20000000 kB\n";

    fn tree(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = files.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect();
        move |p: &Path| map.get(p).cloned()
    }

    fn read(files: &[(&str, &str)]) -> KernelReading {
        let read = tree(files);
        let cg = Cgroup::discover(&read);
        read_with(&read, cg.as_ref(), None)
    }

    #[test]
    fn cgroup_limit_below_ram_wins() {
        let r = read(&[
            ("/proc/meminfo", MEMINFO),
            ("/proc/self/mountinfo", MOUNTINFO),
            ("/proc/self/cgroup", "0::/app\n"),
            ("/sys/fs/cgroup/cgroup.controllers", "memory\n"),
            ("/sys/fs/cgroup/app/memory.max", "536870912\n"),
            (
                "/sys/fs/cgroup/app/memory.pressure",
                "some avg10=2.00 avg60=1.00 avg300=0.50 total=99\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=9\n",
            ),
            (
                "/proc/pressure/memory",
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
            ),
        ]);
        assert_eq!(r.limit, Some(Limit::new(512 << 20, LimitSource::Cgroup)));
        assert_eq!(
            r.signals.psi_source,
            Some(PsiSource::Cgroup),
            "the group's own PSI first"
        );
        assert_eq!(r.signals.psi.unwrap().some.avg10, 2.0);
        assert_eq!(r.signals.cgroup.as_ref().unwrap().version, 2);
    }

    #[test]
    fn unlimited_malformed_or_above_ram_falls_back_to_ram() {
        for max in ["max\n", "garbage\n", "", "999999999999999\n"] {
            let r = read(&[
                ("/proc/meminfo", MEMINFO),
                ("/proc/self/mountinfo", MOUNTINFO),
                ("/proc/self/cgroup", "0::/app\n"),
                ("/sys/fs/cgroup/cgroup.controllers", "memory\n"),
                ("/sys/fs/cgroup/app/memory.max", max),
            ]);
            assert_eq!(
                r.limit,
                Some(Limit::new(24576000 * 1024, LimitSource::System)),
                "{max:?}"
            );
        }
    }

    #[test]
    fn configured_always_wins_and_nothing_readable_is_none() {
        let read = tree(&[("/proc/meminfo", MEMINFO)]);
        let r = read_with(&read, None, Some(123));
        assert_eq!(r.limit, Some(Limit::new(123, LimitSource::Configured)));
        let nothing = read_with(&|_: &Path| None, None, None);
        assert_eq!(nothing.limit, None);
        assert_eq!(*nothing.signals, KernelSignals::default());
    }

    #[test]
    fn system_psi_when_the_group_has_none() {
        let r = read(&[(
            "/proc/pressure/memory",
            "some avg10=0.10 avg60=0.00 avg300=0.00 total=5\n",
        )]);
        assert_eq!(r.signals.psi_source, Some(PsiSource::System));
        assert!(r.signals.psi.unwrap().full.is_none());
        assert!(r.signals.cgroup.is_none());
    }
}
