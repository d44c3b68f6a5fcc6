//! The process's memory cgroup, v1 or v2: where it is, its limits and its events.
//!
//! Mount points come from `/proc/self/mountinfo` and the process's groups from
//! `/proc/self/cgroup`, never from hard-coded paths. Every function reads through a
//! `read` function so whole trees are tested as fixtures.

use std::path::{Path, PathBuf};

/// A file reader: the live system's is `std::fs::read_to_string`.
pub(crate) type Read<'a> = &'a dyn Fn(&Path) -> Option<String>;

/// cgroup v1 reports "unlimited" as a huge page-rounded number (≈ 2^63).
const V1_UNLIMITED: u64 = 1 << 62;

/// The hierarchy the memory controller is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V1,
    V2,
}

/// The process's memory cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cgroup {
    pub(crate) version: Version,
    /// The hierarchy's mount point.
    pub(crate) mount: PathBuf,
    /// The process's own group directory under it.
    pub(crate) dir: PathBuf,
    /// The group's path in the hierarchy, as `/proc/self/cgroup` shows it.
    pub(crate) path: String,
}

/// cgroup memory event counters, cumulative since the group was created.
///
/// v2 reads them from `memory.events`. v1 has no such file: `oom_kill` comes from
/// `memory.oom_control` and `max` from `memory.failcnt` (the times usage hit the limit);
/// `high` and `oom` are absent there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CgroupEvents {
    /// Times usage went over `memory.high` (the kernel throttled and reclaimed).
    pub high: Option<u64>,
    /// Times usage hit the hard limit.
    pub max: Option<u64>,
    /// Times the group ran out of memory.
    pub oom: Option<u64>,
    /// Processes the OOM killer killed in the group.
    pub oom_kill: Option<u64>,
}

impl Cgroup {
    /// Finds the memory cgroup: v2 when a cgroup2 hierarchy with the memory controller
    /// holds the process, else v1's memory hierarchy.
    pub(crate) fn discover(read: Read<'_>) -> Option<Self> {
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let membership = read(Path::new("/proc/self/cgroup"))?;
        let v2 = || {
            let mount = mounts(&mountinfo).find(|m| m.fstype == "cgroup2")?;
            let path = membership.lines().find_map(|l| l.strip_prefix("0::"))?;
            let group = Self::at(Version::V2, &mount, path);
            // A v2 hierarchy without the memory controller (hybrid hosts) has no limits.
            let controllers = read(&mount.point.join("cgroup.controllers")).unwrap_or_default();
            controllers.split_whitespace().any(|c| c == "memory").then_some(group)
        };
        let v1 = || {
            let mount =
                mounts(&mountinfo).find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == "memory"))?;
            let path = membership.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers.split(',').any(|c| c == "memory").then_some(path)
            })?;
            Some(Self::at(Version::V1, &mount, path))
        };
        v2().or_else(v1)
    }

    fn at(version: Version, mount: &Mount, path: &str) -> Self {
        // Without a cgroup namespace the mount may show a sub-tree: paths are relative to it.
        let relative = path
            .strip_prefix(mount.root.as_str())
            .unwrap_or(path)
            .trim_start_matches('/');
        Self {
            version,
            mount: mount.point.clone(),
            dir: mount.point.join(relative),
            path: path.to_owned(),
        }
    }

    /// The tightest hard limit from the group up to the hierarchy's root; `None` when
    /// every level is unlimited or unreadable.
    pub(crate) fn limit(&self, read: Read<'_>) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        };
        self.tightest(read, file)
    }

    /// The tightest `memory.high` (v2 only): past it the kernel throttles and reclaims.
    pub(crate) fn high(&self, read: Read<'_>) -> Option<u64> {
        match self.version {
            Version::V2 => self.tightest(read, "memory.high"),
            Version::V1 => None,
        }
    }

    fn tightest(&self, read: Read<'_>, file: &str) -> Option<u64> {
        let mut dir = self.dir.clone();
        let mut tightest: Option<u64> = None;
        loop {
            if let Some(limit) = read(&dir.join(file)).and_then(|t| parse_limit(&t, self.version)) {
                tightest = Some(tightest.map_or(limit, |t| t.min(limit)));
            }
            if dir == self.mount || !dir.starts_with(&self.mount) || !dir.pop() {
                break;
            }
        }
        tightest
    }

    /// The group's memory event counters; `None` when no event file is readable.
    pub(crate) fn events(&self, read: Read<'_>) -> Option<CgroupEvents> {
        match self.version {
            Version::V2 => read(&self.dir.join("memory.events")).map(|t| parse_events_v2(&t)),
            Version::V1 => {
                let oom_kill = read(&self.dir.join("memory.oom_control")).and_then(|t| keyed(&t, "oom_kill"));
                let failcnt = read(&self.dir.join("memory.failcnt")).and_then(|t| t.trim().parse().ok());
                (oom_kill.is_some() || failcnt.is_some()).then_some(CgroupEvents {
                    max: failcnt,
                    oom_kill,
                    ..CgroupEvents::default()
                })
            }
        }
    }

    /// The group's own PSI file (v2 only).
    pub(crate) fn pressure_file(&self) -> Option<PathBuf> {
        (self.version == Version::V2).then(|| self.dir.join("memory.pressure"))
    }
}

/// A limit file's value: `max` (v2) or a huge number (v1) is no limit.
pub(crate) fn parse_limit(text: &str, version: Version) -> Option<u64> {
    match text.trim() {
        "max" => None,
        n => n
            .parse::<u64>()
            .ok()
            .filter(|v| version == Version::V2 || *v < V1_UNLIMITED),
    }
}

/// v2 `memory.events`: `low N`, `high N`, `max N`, `oom N`, `oom_kill N`, ...
pub(crate) fn parse_events_v2(text: &str) -> CgroupEvents {
    CgroupEvents {
        high: keyed(text, "high"),
        max: keyed(text, "max"),
        oom: keyed(text, "oom"),
        oom_kill: keyed(text, "oom_kill"),
    }
}

/// The number after `key` in `key value` lines.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

struct Mount {
    point: PathBuf,
    root: String,
    fstype: String,
    options: String,
}

/// The mounts in `/proc/self/mountinfo` text.
fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount> + '_ {
    mountinfo.lines().filter_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let fstype = right.next()?.to_owned();
        let options = right.nth(1).unwrap_or_default().to_owned();
        let mut left = left.split_whitespace();
        let root = unescape_octal(left.nth(3)?);
        let point = PathBuf::from(unescape_octal(left.next()?));
        Some(Mount {
            point,
            root,
            fstype,
            options,
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match digits.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// This machine's layout: hybrid, v1 memory controller, v2 without memory.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
    const V2_ONLY: &str = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";

    pub(crate) fn tree(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = files.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect();
        move |p: &Path| map.get(p).cloned()
    }

    #[test]
    fn v1_nested_group_tightest_limit() {
        let read = tree(&[
            ("/proc/self/mountinfo", HYBRID),
            ("/proc/self/cgroup", "4:memory:/process_api/abc\n1:cpu:/\n0::/\n"),
            ("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n"),
            (
                "/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            ("/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes", "268435456\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            (
                "/sys/fs/cgroup/memory/process_api/abc/memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            ("/sys/fs/cgroup/memory/process_api/abc/memory.failcnt", "17\n"),
        ]);
        let cg = Cgroup::discover(&read).unwrap();
        assert_eq!(cg.version, Version::V1);
        assert_eq!(cg.dir, PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"));
        assert_eq!(cg.limit(&read), Some(256 << 20));
        assert_eq!(cg.high(&read), None);
        let events = cg.events(&read).unwrap();
        assert_eq!((events.oom_kill, events.max, events.high), (Some(2), Some(17), None));
    }

    #[test]
    fn v1_unlimited_is_none() {
        let read = tree(&[
            ("/proc/self/mountinfo", HYBRID),
            ("/proc/self/cgroup", "4:memory:/a\n"),
            ("/sys/fs/cgroup/memory/a/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
        ]);
        assert_eq!(Cgroup::discover(&read).unwrap().limit(&read), None);
    }

    #[test]
    fn v2_nested_tightest_max_and_high() {
        let read = tree(&[
            ("/proc/self/mountinfo", V2_ONLY),
            ("/proc/self/cgroup", "0::/kubepods/pod1/ctr\n"),
            ("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n"),
            ("/sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n"),
            ("/sys/fs/cgroup/kubepods/pod1/ctr/memory.high", "402653184\n"),
            ("/sys/fs/cgroup/kubepods/pod1/memory.max", "536870912\n"),
            ("/sys/fs/cgroup/kubepods/memory.max", "1073741824\n"),
            (
                "/sys/fs/cgroup/kubepods/pod1/ctr/memory.events",
                "low 0\nhigh 12\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
        ]);
        let cg = Cgroup::discover(&read).unwrap();
        assert_eq!(cg.version, Version::V2);
        assert_eq!(cg.limit(&read), Some(512 << 20));
        assert_eq!(cg.high(&read), Some(384 << 20));
        assert_eq!(
            cg.events(&read),
            Some(CgroupEvents {
                high: Some(12),
                max: Some(3),
                oom: Some(1),
                oom_kill: Some(1)
            })
        );
        assert_eq!(
            cg.pressure_file(),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/pod1/ctr/memory.pressure"))
        );
    }

    #[test]
    fn v2_unlimited_everywhere() {
        let read = tree(&[
            ("/proc/self/mountinfo", V2_ONLY),
            ("/proc/self/cgroup", "0::/app\n"),
            ("/sys/fs/cgroup/cgroup.controllers", "memory\n"),
            ("/sys/fs/cgroup/app/memory.max", "max\n"),
        ]);
        assert_eq!(Cgroup::discover(&read).unwrap().limit(&read), None);
    }

    #[test]
    fn v2_without_memory_controller_falls_back_to_v1() {
        let read = tree(&[
            ("/proc/self/mountinfo", HYBRID),
            ("/proc/self/cgroup", "4:memory:/x\n0::/x\n"),
            ("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n"),
        ]);
        assert_eq!(Cgroup::discover(&read).unwrap().version, Version::V1);
    }

    #[test]
    fn malformed_files_are_unknown_never_a_panic() {
        for (mountinfo, cgroup) in [
            ("", ""),
            ("garbage\n\n - \n", "0::/x\n"),
            (V2_ONLY, "no colons here\n"),
            (HYBRID, "4:memory\n"),
            ("1 2 3 - cgroup2\n", "0::/\n"),
        ] {
            let read = tree(&[("/proc/self/mountinfo", mountinfo), ("/proc/self/cgroup", cgroup)]);
            if let Some(cg) = Cgroup::discover(&read) {
                assert_eq!(cg.limit(&read), None);
                assert_eq!(cg.events(&read), None);
            }
        }
        for text in ["", "lots", "-5", "12 34", "0x100"] {
            assert_eq!(parse_limit(text, Version::V2), None, "{text:?}");
        }
        assert_eq!(parse_events_v2("high x\nmax\n"), CgroupEvents::default());
    }

    #[test]
    fn subtree_mounts_and_escapes() {
        let read = tree(&[
            (
                "/proc/self/mountinfo",
                "40 24 0:30 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            ),
            ("/proc/self/cgroup", "0::/docker/abc\n"),
            ("/sys/fs/cgroup/cgroup.controllers", "memory\n"),
            ("/sys/fs/cgroup/memory.max", "268435456\n"),
        ]);
        assert_eq!(Cgroup::discover(&read).unwrap().limit(&read), Some(256 << 20));
        assert_eq!(unescape_octal(r"/mnt/my\040dir"), "/mnt/my dir");
    }
}
