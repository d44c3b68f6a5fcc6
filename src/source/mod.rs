//! Sources: each reads one thing about the process or the kernel.
//!
//! A source returns `None` where the platform or build cannot tell, never panics and
//! never logs per call. Parsers take a file's text as input so they are tested on
//! fixtures; the reading around them is a thin shell.

pub(crate) mod cgroup;
pub(crate) mod limit;
pub(crate) mod peak;
pub(crate) mod psi;
pub(crate) mod statm;

#[cfg(feature = "jemalloc")]
pub(crate) mod jemalloc;
#[cfg(feature = "jemalloc")]
pub(crate) mod pools;

use std::fs::File;
use std::path::Path;

/// A `/proc` file kept open and re-read at offset 0 with `pread`: several times
/// cheaper than open + read + close, and the kernel regenerates the text on each read.
#[derive(Debug)]
pub(crate) struct ProcFile {
    file: File,
}

impl ProcFile {
    pub(crate) fn open(path: impl AsRef<Path>) -> Option<Self> {
        File::open(path).ok().map(|file| Self { file })
    }

    /// Reads the whole file into `buf` and returns the filled part; `None` on an
    /// error or when the file does not fit.
    ///
    /// A `/proc` file smaller than the buffer comes back whole from one read, so a
    /// short read ends it: no second `pread` just to see end-of-file.
    #[cfg(unix)]
    pub(crate) fn read_into<'b>(&self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        use std::os::unix::fs::FileExt;
        let mut filled = 0;
        loop {
            if filled == buf.len() {
                return None;
            }
            match self.file.read_at(&mut buf[filled..], filled as u64) {
                Ok(0) => return Some(&buf[..filled]),
                Ok(n) => {
                    filled += n;
                    if filled < buf.len() {
                        return Some(&buf[..filled]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    #[cfg(not(unix))]
    pub(crate) fn read_into<'b>(&self, _buf: &'b mut [u8]) -> Option<&'b [u8]> {
        None
    }
}

/// Parses the leading unsigned decimal of `s` (after ASCII spaces); `None` when
/// there is none or it overflows.
pub(crate) fn parse_u64_prefix(s: &[u8]) -> Option<(u64, &[u8])> {
    let start = s.iter().position(|b| *b != b' ' && *b != b'\t')?;
    let s = &s[start..];
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut value: u64 = 0;
    for b in &s[..digits] {
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((value, &s[digits..]))
}

/// The value in kB of a `Name:   1234 kB` line of `/proc/self/status` or
/// `/proc/meminfo`, in bytes.
pub(crate) fn parse_kb_field(text: &[u8], name: &[u8]) -> Option<u64> {
    text.split(|b| *b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(b":")?;
        let (kb, unit) = parse_u64_prefix(rest)?;
        if unit.trim_ascii() != b"kB" {
            return None;
        }
        kb.checked_mul(1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_and_refuses_garbage() {
        assert_eq!(parse_u64_prefix(b"  42 rest"), Some((42, &b" rest"[..])));
        assert_eq!(parse_u64_prefix(b"x42"), None);
        assert_eq!(parse_u64_prefix(b""), None);
        assert_eq!(parse_u64_prefix(b"99999999999999999999999"), None);
    }

    #[test]
    fn parses_kb_fields() {
        let status = b"Name:\tcat\nVmPeak:\t    8000 kB\nVmHWM:\t     1234 kB\nVmRSS:\t  1000 kB\n";
        assert_eq!(parse_kb_field(status, b"VmHWM"), Some(1234 * 1024));
        assert_eq!(parse_kb_field(status, b"VmSwap"), None);
        assert_eq!(parse_kb_field(b"VmHWM:\t12 MB\n", b"VmHWM"), None);
        assert_eq!(parse_kb_field(b"VmHWM:\tlots kB\n", b"VmHWM"), None);
    }
}
