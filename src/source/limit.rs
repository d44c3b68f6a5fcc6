//! The memory limit the kernel will enforce: the cgroup's, else physical RAM.
//!
//! Every parser takes a file's text; [`detect_with`] takes a reader function so the
//! whole detection runs on fixture trees in tests.

use std::path::{Path, PathBuf};

use super::parse_kb_field;
use crate::snapshot::{Limit, LimitSource};

/// The limit from the live system: cgroup v2 `memory.max` (tightest on the path up
/// to the hierarchy's root) when it is below physical RAM, else physical RAM.
pub(crate) fn detect() -> Option<Limit> {
    detect_with(&|path: &Path| std::fs::read_to_string(path).ok())
}

/// [`detect`] over any file reader (absolute paths, as on the live system).
pub(crate) fn detect_with(read: &dyn Fn(&Path) -> Option<String>) -> Option<Limit> {
    let ram = read(Path::new("/proc/meminfo")).and_then(|t| parse_kb_field(t.as_bytes(), b"MemTotal"));
    let cgroup = cgroup_v2_limit(read);
    match (cgroup, ram) {
        // A cgroup limit above physical RAM is no limit: RAM runs out first.
        (Some(c), Some(r)) if c < r => Some(Limit::new(c, LimitSource::Cgroup)),
        (Some(c), None) => Some(Limit::new(c, LimitSource::Cgroup)),
        (_, Some(r)) => Some(Limit::new(r, LimitSource::System)),
        (None, None) => None,
    }
}

/// The tightest numeric `memory.max` from the process's cgroup up to the root of the
/// mounted cgroup v2 hierarchy.
fn cgroup_v2_limit(read: &dyn Fn(&Path) -> Option<String>) -> Option<u64> {
    let mount = parse_cgroup2_mount(&read(Path::new("/proc/self/mountinfo"))?)?;
    let own = parse_cgroup_v2_path(&read(Path::new("/proc/self/cgroup"))?)?;
    // Without a cgroup namespace the mount may show a sub-tree: paths are relative to it.
    let relative = own
        .strip_prefix(mount.root.as_str())
        .unwrap_or(own.as_str())
        .trim_start_matches('/');
    let mut dir = mount.point.join(relative);
    let mut tightest: Option<u64> = None;
    loop {
        if let Some(MemoryMax::Bytes(b)) = read(&dir.join("memory.max")).and_then(|t| parse_memory_max(&t)) {
            tightest = Some(tightest.map_or(b, |t| t.min(b)));
        }
        if dir == mount.point || !dir.pop() {
            break;
        }
    }
    tightest
}

/// A mounted cgroup hierarchy: the mount point and the hierarchy path shown there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    pub(crate) point: PathBuf,
    pub(crate) root: String,
}

/// The first cgroup v2 mount in `/proc/self/mountinfo` text.
pub(crate) fn parse_cgroup2_mount(mountinfo: &str) -> Option<CgroupMount> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        Some(CgroupMount {
            point: PathBuf::from(unescape_octal(point)),
            root: unescape_octal(root),
        })
    })
}

/// The cgroup v2 path (`0::/path`) in `/proc/self/cgroup` text.
pub(crate) fn parse_cgroup_v2_path(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
        .map(str::to_owned)
}

/// A cgroup v2 `memory.max` / `memory.high` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemoryMax {
    /// `max`: no limit at this level.
    Unlimited,
    /// A limit in bytes.
    Bytes(u64),
}

pub(crate) fn parse_memory_max(text: &str) -> Option<MemoryMax> {
    match text.trim() {
        "max" => Some(MemoryMax::Unlimited),
        n => n.parse().ok().map(MemoryMax::Bytes),
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
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

    const MOUNTINFO: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
36 24 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
";
    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:        20000000 kB\n";

    fn tree(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = files.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect();
        move |p: &Path| map.get(p).cloned()
    }

    #[test]
    fn finds_the_cgroup2_mount_and_own_path() {
        let m = parse_cgroup2_mount(MOUNTINFO).unwrap();
        assert_eq!(m.point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m.root, "/");
        let own = parse_cgroup_v2_path("12:memory:/user.slice\n0::/user.slice/app.service\n");
        assert_eq!(own.as_deref(), Some("/user.slice/app.service"));
        assert_eq!(parse_cgroup_v2_path("12:memory:/x\n"), None);
    }

    #[test]
    fn tightest_limit_on_the_path_wins() {
        let read = tree(&[
            ("/proc/meminfo", MEMINFO),
            ("/proc/self/mountinfo", MOUNTINFO),
            ("/proc/self/cgroup", "0::/kubepods/pod1/ctr\n"),
            ("/sys/fs/cgroup/unified/kubepods/pod1/ctr/memory.max", "max\n"),
            ("/sys/fs/cgroup/unified/kubepods/pod1/memory.max", "536870912\n"),
            ("/sys/fs/cgroup/unified/kubepods/memory.max", "1073741824\n"),
        ]);
        assert_eq!(detect_with(&read), Some(Limit::new(512 << 20, LimitSource::Cgroup)));
    }

    #[test]
    fn unlimited_or_malformed_cgroup_falls_back_to_ram() {
        for max in ["max\n", "garbage\n", ""] {
            let read = tree(&[
                ("/proc/meminfo", MEMINFO),
                ("/proc/self/mountinfo", MOUNTINFO),
                ("/proc/self/cgroup", "0::/app\n"),
                ("/sys/fs/cgroup/unified/app/memory.max", max),
            ]);
            assert_eq!(
                detect_with(&read),
                Some(Limit::new(24576000 * 1024, LimitSource::System)),
                "{max:?}"
            );
        }
    }

    #[test]
    fn cgroup_limit_above_ram_is_no_limit() {
        let read = tree(&[
            ("/proc/meminfo", MEMINFO),
            ("/proc/self/mountinfo", MOUNTINFO),
            ("/proc/self/cgroup", "0::/\n"),
            ("/sys/fs/cgroup/unified/memory.max", "999999999999999\n"),
        ]);
        assert_eq!(detect_with(&read).unwrap().source, LimitSource::System);
    }

    #[test]
    fn mount_showing_a_subtree_is_resolved() {
        let mountinfo = "40 24 0:30 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let read = tree(&[
            ("/proc/self/mountinfo", mountinfo),
            ("/proc/self/cgroup", "0::/docker/abc\n"),
            ("/sys/fs/cgroup/memory.max", "268435456\n"),
        ]);
        assert_eq!(detect_with(&read), Some(Limit::new(256 << 20, LimitSource::Cgroup)));
    }

    #[test]
    fn nothing_readable_is_none() {
        assert_eq!(detect_with(&|_: &Path| None), None);
        assert_eq!(parse_cgroup2_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_octal(r"/mnt/my\040dir"), "/mnt/my dir");
        assert_eq!(unescape_octal(r"/a\\b\0"), r"/a\\b\0");
    }
}
