//! The real OpenTelemetry Collector and Prometheus in tests: getting the binaries, running them
//! as guarded children on free ports, and reading what they serve.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// How long a collector or Prometheus may take to become ready.
pub const READY: Duration = Duration::from_secs(60);

/// Runs one of the repository's scripts and returns the path it prints on stdout; a failure
/// fails the test with the script's stderr (nothing is skipped).
fn script_path(script: &str) -> PathBuf {
    let path = repo().join("scripts").join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed ({}): {stdout}",
        path.display(),
        out.status
    );
    let printed = PathBuf::from(stdout.trim());
    assert!(
        printed.is_file(),
        "{} printed {printed:?}, which is no file",
        path.display()
    );
    printed
}

/// The test collector: `$MEMTEL_OTELCOL` if set, else built (or reused) by
/// `scripts/build-collector.sh`.
pub fn otelcol() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("MEMTEL_OTELCOL") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(path.is_file(), "MEMTEL_OTELCOL={} is no file", path.display());
            path
        }
        None => script_path("build-collector.sh"),
    })
}

/// Prometheus: the one on PATH, else installed by `scripts/install-prometheus.sh`.
pub fn prometheus() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| script_path("install-prometheus.sh"))
}

/// A child process that is killed and reaped when dropped (a failing assertion included),
/// with its output in a file kept until then.
pub struct Guard {
    child: Child,
    pub what: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Makes the child die with the test process even if that is killed before the guards drop.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Guard {
    pub fn spawn(mut cmd: Command, what: impl Into<String>) -> Guard {
        let what = what.into();
        die_with_parent(&mut cmd);
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let file = File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
        Guard {
            child,
            what,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Fails the test if the child has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("{} exited with {status}; its log:\n{}", self.what, self.tail(40));
        }
    }

    /// Waits (at most [`READY`]) until `url` answers 200 while the child keeps running.
    pub fn wait_http_ok(&mut self, url: &str) {
        let client = http();
        let start = Instant::now();
        loop {
            self.assert_running();
            let last = match client.get(url).send() {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => format!("status {}", r.status()),
                Err(e) => e.to_string(),
            };
            assert!(
                start.elapsed() < READY,
                "{}: no 200 from {url} within {READY:?} (last: {last}); log:\n{}",
                self.what,
                self.tail(40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Free loopback ports for one collector started from a repository config.
pub struct CollectorPorts {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub prometheus: SocketAddr,
    pub health: SocketAddr,
}

impl CollectorPorts {
    pub fn free(free_addr: fn() -> SocketAddr) -> Self {
        CollectorPorts {
            grpc: free_addr(),
            http: free_addr(),
            prometheus: free_addr(),
            health: free_addr(),
        }
    }

    /// The variables the repository's configs read their listen addresses from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTLP_GRPC_ENDPOINT", self.grpc.to_string()),
            ("OTLP_HTTP_ENDPOINT", self.http.to_string()),
            ("PROMETHEUS_EXPORTER_ENDPOINT", self.prometheus.to_string()),
            ("HEALTH_CHECK_ENDPOINT", self.health.to_string()),
        ]
    }
}

/// The collector with `config`, the given environment and nothing inherited that a config reads.
pub fn collector_command(config: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(otelcol());
    cmd.arg("--config").arg(config);
    for name in CONFIG_VARS {
        cmd.env_remove(name);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd
}

/// Every variable the repository's collector configs read.
pub const CONFIG_VARS: &[&str] = &[
    "OTLP_GRPC_ENDPOINT",
    "OTLP_HTTP_ENDPOINT",
    "PROMETHEUS_EXPORTER_ENDPOINT",
    "HEALTH_CHECK_ENDPOINT",
    "GATEWAY_OTLP_ENDPOINT",
    "BACKEND_OTLP_ENDPOINT",
    "BACKEND_OTLP_HEADERS",
    "VENDOR_OTLP_ENDPOINT",
    "VENDOR_OTLP_HEADERS",
];

/// Starts a collector and waits until its health_check extension reports it available.
pub fn start_collector(config: &Path, ports: &CollectorPorts, extra: &[(&str, String)], what: &str) -> Guard {
    let mut env = ports.env();
    env.extend(extra.iter().cloned());
    let mut guard = Guard::spawn(collector_command(config, &env), what);
    guard.wait_http_ok(&format!("http://{}/", ports.health));
    guard
}

/// One sample of the Prometheus text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// What a `/metrics` page holds: samples, and `# TYPE` per metric family.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Samples of `name` whose labels include every `(key, value)` of `with`.
    pub fn find(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The single sample of `name` with those labels; fails the test otherwise.
    pub fn one(&self, name: &str, with: &[(&str, &str)]) -> &Sample {
        let found = self.find(name, with);
        assert_eq!(found.len(), 1, "expected one {name} with {with:?}, found {found:#?}");
        found[0]
    }
}

/// Parses the text exposition format (version 0.0.4), failing the test on a malformed line.
pub fn parse_exposition(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                out.types.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        out.samples
            .push(parse_sample(line).unwrap_or_else(|| panic!("malformed exposition line: {line}")));
    }
    out
}

fn parse_sample(line: &str) -> Option<Sample> {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() && chars[i] != '{' && !chars[i].is_whitespace() {
        i += 1;
    }
    let name: String = chars[..i].iter().collect();
    let mut labels = BTreeMap::new();
    if chars.get(i) == Some(&'{') {
        i += 1;
        loop {
            while chars.get(i).is_some_and(|c| *c == ',' || c.is_whitespace()) {
                i += 1;
            }
            if *chars.get(i)? == '}' {
                i += 1;
                break;
            }
            let key_start = i;
            while *chars.get(i)? != '=' {
                i += 1;
            }
            let key: String = chars[key_start..i].iter().collect::<String>().trim().to_string();
            i += 1;
            if *chars.get(i)? != '"' {
                return None;
            }
            i += 1;
            let mut value = String::new();
            loop {
                match *chars.get(i)? {
                    '"' => break,
                    '\\' => {
                        i += 1;
                        match *chars.get(i)? {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        }
                    }
                    other => value.push(other),
                }
                i += 1;
            }
            i += 1;
            labels.insert(key, value);
        }
    }
    let rest: String = chars[i..].iter().collect();
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// GET `url` and its body, failing the test on an error status.
pub fn get_text(client: &reqwest::blocking::Client, url: &str) -> String {
    let response = client.get(url).send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    let body = response.text().unwrap_or_else(|e| panic!("GET {url}: body: {e}"));
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// A PromQL instant query against Prometheus' HTTP API: the `data.result` vector.
pub fn promql(client: &reqwest::blocking::Client, prometheus: SocketAddr, query: &str) -> Vec<serde_json::Value> {
    let url = format!("http://{prometheus}/api/v1/query?query={}", percent_encode(query));
    let response = client
        .get(&url)
        .send()
        .unwrap_or_else(|e| panic!("PromQL {query}: {e}"));
    let status = response.status();
    let body = response.text().expect("body");
    assert_eq!(status, 200, "PromQL {query}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("PromQL {query}: {e}: {body}"));
    assert_eq!(json["status"], "success", "PromQL {query}: {body}");
    json["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// `%XX` for every byte but unreserved ones (RFC 3986), for a query string.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A stand-in for a vendor's OTLP/HTTP intake: answers every request 200 and records the
/// request line and headers (names lower-cased) and the body's length.
pub struct FakeIntake {
    pub addr: SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body_len: usize,
}

impl FakeIntake {
    pub fn start() -> FakeIntake {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = log.clone();
                thread::spawn(move || {
                    let mut writer = match stream.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let method = parts.next().unwrap_or_default().to_string();
                        let path = parts.next().unwrap_or_default().to_string();
                        let mut headers = BTreeMap::new();
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                            }
                        }
                        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        log.lock().expect("lock").push(Request {
                            method,
                            path,
                            headers,
                            body_len: len,
                        });
                        let reply =
                            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                        if writer.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeIntake { addr, seen }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().expect("lock").clone()
    }
}
