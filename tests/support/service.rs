//! Running the `memtel` binary from tests: a clean environment, free ports, and a
//! child that is always killed and reaped.
#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_memtel");
pub const PROFILE: &str = "/api/v1/memory/profile";
/// The bound on every wait for the child (start, exit).
pub const WAIT: Duration = Duration::from_secs(10);
/// How often a bounded wait looks again.
pub const POLL: Duration = Duration::from_millis(25);

/// The binary with a clean environment and nothing exported.
pub fn memtel() -> Command {
    let mut cmd = Command::new(BIN);
    // Variables the binary (or the OpenTelemetry SDK inside it) reads: never inherited.
    cmd.env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str() {
            if name.starts_with("MEMTEL_") || name.starts_with("OTEL_") {
                cmd.env_remove(name);
            }
        }
    }
    cmd.env("OTEL_METRICS_EXPORTER", "none");
    cmd.stdin(Stdio::null());
    cmd
}

/// A loopback address nobody listens on (bound, read, released).
pub fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr")
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

/// A running (or exited) child; killed and reaped when dropped, so a failing
/// assertion never leaves a server behind.
pub struct Proc {
    child: Child,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to files.
    pub fn spawn(mut cmd: Command, what: impl Into<String>) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        cmd.stdout(File::create(&stdout).expect("stdout file"));
        cmd.stderr(File::create(&stderr).expect("stderr file"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        Proc {
            child,
            what: what.into(),
            stdout,
            stderr,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// Waits for the child to exit, at most `within`; fails the test otherwise.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > within {
                panic!(
                    "{}: still running after {within:?}; stderr so far:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until `GET /healthz` on `addr` answers 200; fails the test if the
    /// child exits first or nothing answers within [`WAIT`].
    pub fn wait_ready(&mut self, client: &reqwest::blocking::Client, addr: SocketAddr) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{}: exited with {status} before serving; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            let last = match client.get(format!("http://{addr}/healthz")).send() {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => format!("status {}", r.status()),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > WAIT {
                panic!(
                    "{}: no 200 from http://{addr}/healthz within {WAIT:?} (last: {last}); stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion (bounded by [`WAIT`]): status, stdout, stderr.
pub fn run(cmd: Command, what: &str) -> (ExitStatus, String, String) {
    let mut proc = Proc::spawn(cmd, what);
    let status = proc.wait_exit(WAIT);
    (status, proc.stdout(), proc.stderr())
}

pub fn get_json(client: &reqwest::blocking::Client, addr: SocketAddr, path: &str) -> Value {
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status();
    let body = response.text().expect("body");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// The resident set size of `pid` in MiB, from `/proc/<pid>/status` (kB = KiB there).
pub fn vm_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    kib / 1024.0
}
