//! `go tool pprof` (the Go toolchain on the machine) run on a profile file: what a real pprof
//! client makes of memtel's profiles.

use std::path::Path;
use std::process::Command;

/// `go tool pprof <args> <file>`'s output; panics (with its stderr) if it fails.
pub fn go_pprof(args: &[&str], file: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("go tool pprof (the Go toolchain)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}
