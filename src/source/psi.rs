//! Pressure stall information: `/proc/pressure/memory` or a v2 cgroup's `memory.pressure`.

/// One PSI line: the share of time (percent) tasks stalled on memory over 10 s, 60 s
/// and 300 s, and the total stall time.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PsiLine {
    /// Percent of the last 10 s.
    pub avg10: f64,
    /// Percent of the last 60 s.
    pub avg60: f64,
    /// Percent of the last 300 s.
    pub avg300: f64,
    /// Total stall time in microseconds.
    pub total_us: u64,
}

/// Memory PSI: `some` (at least one task stalled) and `full` (all non-idle tasks stalled).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Psi {
    /// At least one task stalled.
    pub some: PsiLine,
    /// All non-idle tasks stalled at once; absent on kernels that only report `some`.
    pub full: Option<PsiLine>,
}

/// Parses PSI text; `None` without a well-formed `some` line.
pub(crate) fn parse(text: &str) -> Option<Psi> {
    let line = |kind: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(kind)?.strip_prefix(' ').map(parse_line))?
    };
    Some(Psi {
        some: line("some")?,
        full: line("full"),
    })
}

fn parse_line(rest: &str) -> Option<PsiLine> {
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let avg = |name: &str| field(name)?.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
    Some(PsiLine {
        avg10: avg("avg10")?,
        avg60: avg("avg60")?,
        avg300: avg("avg300")?,
        total_us: field("total")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_some_and_full() {
        let psi = parse(
            "some avg10=1.53 avg60=0.20 avg300=0.05 total=123456\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=4567\n",
        )
        .unwrap();
        assert_eq!(psi.some.avg10, 1.53);
        assert_eq!(psi.some.total_us, 123456);
        assert_eq!(psi.full.unwrap().avg60, 0.10);
    }

    #[test]
    fn some_only_and_malformed() {
        assert!(parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
            .unwrap()
            .full
            .is_none());
        for bad in [
            "",
            "some avg10=x avg60=0 avg300=0 total=0",
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0",
            "some\n",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
