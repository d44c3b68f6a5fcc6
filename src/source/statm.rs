//! Resident and virtual size from `/proc/self/statm`.

use super::{parse_u64_prefix, ProcFile};

/// Sizes read from statm, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatmValues {
    pub(crate) virtual_bytes: u64,
    pub(crate) resident_bytes: u64,
}

/// `/proc/self/statm`, kept open. Its fields are in pages.
#[derive(Debug)]
pub(crate) struct Statm {
    file: ProcFile,
    page_size: u64,
}

impl Statm {
    pub(crate) fn open() -> Option<Self> {
        Some(Self {
            file: ProcFile::open("/proc/self/statm")?,
            page_size: page_size()?,
        })
    }

    pub(crate) fn read(&self) -> Option<StatmValues> {
        // statm is seven decimals of at most 20 digits each.
        let mut buf = [0u8; 192];
        parse(self.file.read_into(&mut buf)?, self.page_size)
    }
}

/// Parses statm's text: `size resident shared text lib data dt`, in pages.
pub(crate) fn parse(text: &[u8], page_size: u64) -> Option<StatmValues> {
    let (size, rest) = parse_u64_prefix(text)?;
    let (resident, _) = parse_u64_prefix(rest)?;
    Some(StatmValues {
        virtual_bytes: size.checked_mul(page_size)?,
        resident_bytes: resident.checked_mul(page_size)?,
    })
}

#[cfg(unix)]
fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0)
}

#[cfg(not(unix))]
fn page_size() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pages_into_bytes() {
        let v = parse(b"5438 1090 842 221 0 277 0\n", 4096).unwrap();
        assert_eq!(v.virtual_bytes, 5438 * 4096);
        assert_eq!(v.resident_bytes, 1090 * 4096);
    }

    #[test]
    fn malformed_is_none() {
        assert_eq!(parse(b"", 4096), None);
        assert_eq!(parse(b"5438\n", 4096), None);
        assert_eq!(parse(b"abc def", 4096), None);
        assert_eq!(parse(b"18446744073709551615 1", 4096), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn live_read_matches_the_kernel_status() {
        let statm = Statm::open().unwrap();
        let v = statm.read().unwrap();
        let status = std::fs::read("/proc/self/status").unwrap();
        let vm_size = super::super::parse_kb_field(&status, b"VmSize").unwrap();
        // Both describe the same address space; other test threads may map a little.
        let diff = v.virtual_bytes.abs_diff(vm_size) as f64 / vm_size as f64;
        assert!(diff < 0.05, "statm {} vs VmSize {}", v.virtual_bytes, vm_size);
    }
}
