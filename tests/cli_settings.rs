#![cfg(feature = "service")]
//! The `memtel` binary seen from outside: settings errors and their exit codes,
//! precedence (flag > environment > YAML > default), the running server, signals,
//! an address in use, a collector that is down, and `--help`.
//!
//! Every child runs with a cleaned environment (no inherited `MEMTEL_*`, `OTEL_*`
//! or `RUST_LOG`), on a port picked at run time, and is killed if the test fails.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[path = "support/otlp.rs"]
mod otlp;

#[path = "support/service.rs"]
mod service;
use service::*;

// ---------------------------------------------------------------------------
// 1. Invalid settings: status 2, one stderr line naming the setting.
// ---------------------------------------------------------------------------

struct BadCase {
    what: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    /// Written to a file passed with `--config`.
    yaml: Option<&'static str>,
    /// Each must appear in stderr.
    names: &'static [&'static str],
}

const BAD: &[BadCase] = &[
    BadCase {
        what: "--history-interval never",
        args: &["--history-interval", "never"],
        env: &[],
        yaml: None,
        names: &["--history-interval"],
    },
    BadCase {
        what: "MEMTEL_HISTORY_RETENTION=1m (shorter than the trend window)",
        args: &[],
        env: &[("MEMTEL_HISTORY_RETENTION", "1m")],
        yaml: None,
        names: &["MEMTEL_HISTORY_RETENTION"],
    },
    BadCase {
        what: "history.leak_min_samples: 2",
        args: &[],
        env: &[],
        yaml: Some("history:\n  leak_min_samples: 2\n"),
        names: &["history.leak_min_samples"],
    },
    BadCase {
        what: "--leak-confidence-z -1",
        args: &["--leak-confidence-z=-1"],
        env: &[],
        yaml: None,
        names: &["--leak-confidence-z"],
    },
    BadCase {
        what: "--demo-leak-mb-per-min lots",
        args: &["--demo-leak-mb-per-min", "lots"],
        env: &[],
        yaml: None,
        names: &["--demo-leak-mb-per-min"],
    },
    BadCase {
        what: "--gc-trigger-mb -1",
        args: &["--gc-trigger-mb", "-1"],
        env: &[],
        yaml: None,
        names: &["--gc-trigger-mb"],
    },
    BadCase {
        what: "MEMTEL_CHECK_INTERVAL=soon",
        args: &[],
        env: &[("MEMTEL_CHECK_INTERVAL", "soon")],
        yaml: None,
        names: &["MEMTEL_CHECK_INTERVAL"],
    },
    BadCase {
        what: "--check-interval 1ms (below 10ms)",
        args: &["--check-interval", "1ms"],
        env: &[],
        yaml: None,
        names: &["--check-interval"],
    },
    BadCase {
        what: "MEMTEL_COOLDOWN=forever",
        args: &[],
        env: &[("MEMTEL_COOLDOWN", "forever")],
        yaml: None,
        names: &["MEMTEL_COOLDOWN"],
    },
    BadCase {
        what: "--hysteresis at the warning threshold",
        args: &["--hysteresis", "0.8"],
        env: &[],
        yaml: None,
        names: &["--hysteresis"],
    },
    BadCase {
        what: "MEMTEL_PSI_FULL_ESCALATION=150",
        args: &[],
        env: &[("MEMTEL_PSI_FULL_ESCALATION", "150")],
        yaml: None,
        names: &["MEMTEL_PSI_FULL_ESCALATION"],
    },
    BadCase {
        what: "YAML memory.gc_trigger_threshold_mb: lots",
        args: &[],
        env: &[],
        yaml: Some("memory:\n  gc_trigger_threshold_mb: lots\n"),
        names: &["memory.gc_trigger_threshold_mb"],
    },
    BadCase {
        what: "YAML memory.check_interval: 0s",
        args: &[],
        env: &[],
        yaml: Some("memory:\n  check_interval: 0s\n"),
        names: &["memory.check_interval"],
    },
    BadCase {
        what: "OTEL_TRACES_EXPORTER=zipkin",
        args: &[],
        env: &[("OTEL_TRACES_EXPORTER", "zipkin")],
        yaml: None,
        names: &["OTEL_TRACES_EXPORTER"],
    },
    BadCase {
        what: "--limit-mb abc",
        args: &["--limit-mb", "abc"],
        env: &[],
        yaml: None,
        names: &["--limit-mb"],
    },
    BadCase {
        what: "MEMTEL_LIMIT_MB=0",
        args: &[],
        env: &[("MEMTEL_LIMIT_MB", "0")],
        yaml: None,
        names: &["MEMTEL_LIMIT_MB"],
    },
    BadCase {
        what: "--listen nonsense",
        args: &["--listen", "nonsense"],
        env: &[],
        yaml: None,
        names: &["--listen"],
    },
    BadCase {
        what: "MEMTEL_LISTEN without a port",
        args: &[],
        env: &[("MEMTEL_LISTEN", "1.2.3.4")],
        yaml: None,
        names: &["MEMTEL_LISTEN"],
    },
    BadCase {
        what: "--warning-threshold 1.5",
        args: &["--warning-threshold", "1.5"],
        env: &[],
        yaml: None,
        names: &["--warning-threshold"],
    },
    BadCase {
        what: "MEMTEL_CRITICAL_THRESHOLD=x",
        args: &[],
        env: &[("MEMTEL_CRITICAL_THRESHOLD", "x")],
        yaml: None,
        names: &["MEMTEL_CRITICAL_THRESHOLD"],
    },
    BadCase {
        what: "warning above critical (flags)",
        args: &["--warning-threshold", "0.9", "--critical-threshold", "0.8"],
        env: &[],
        yaml: None,
        names: &["--warning-threshold", "--critical-threshold"],
    },
    BadCase {
        what: "warning above critical (environment)",
        args: &[],
        env: &[
            ("MEMTEL_WARNING_THRESHOLD", "0.9"),
            ("MEMTEL_CRITICAL_THRESHOLD", "0.8"),
        ],
        yaml: None,
        names: &["MEMTEL_WARNING_THRESHOLD", "MEMTEL_CRITICAL_THRESHOLD"],
    },
    BadCase {
        what: "MEMTEL_DEMO=maybe",
        args: &[],
        env: &[("MEMTEL_DEMO", "maybe")],
        yaml: None,
        names: &["MEMTEL_DEMO"],
    },
    BadCase {
        what: "OTLP protocol http/json",
        args: &[],
        env: &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
        yaml: None,
        names: &["OTEL_EXPORTER_OTLP_PROTOCOL"],
    },
    BadCase {
        what: "OTLP protocol carrier-pigeon",
        args: &[],
        env: &[("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")],
        yaml: None,
        names: &["OTEL_EXPORTER_OTLP_PROTOCOL"],
    },
    BadCase {
        what: "OTEL_METRICS_EXPORTER=prometheus",
        args: &[],
        env: &[("OTEL_METRICS_EXPORTER", "prometheus")],
        yaml: None,
        names: &["OTEL_METRICS_EXPORTER"],
    },
    BadCase {
        what: "OTEL_METRIC_EXPORT_INTERVAL=-5",
        args: &[],
        env: &[("OTEL_METRIC_EXPORT_INTERVAL", "-5")],
        yaml: None,
        names: &["OTEL_METRIC_EXPORT_INTERVAL"],
    },
    BadCase {
        what: "OTEL_SDK_DISABLED=perhaps",
        args: &[],
        env: &[("OTEL_SDK_DISABLED", "perhaps")],
        yaml: None,
        names: &["OTEL_SDK_DISABLED"],
    },
    BadCase {
        what: "OTLP endpoint without a scheme",
        args: &[],
        env: &[("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4317")],
        yaml: None,
        names: &["OTEL_EXPORTER_OTLP_ENDPOINT"],
    },
    BadCase {
        what: "YAML with an unknown key",
        args: &[],
        env: &[],
        yaml: Some("memory:\n  pressure_treshold: 0.7\n"),
        names: &["pressure_treshold"],
    },
    BadCase {
        what: "YAML with an unknown section",
        args: &[],
        env: &[],
        yaml: Some("servre:\n  listen: 127.0.0.1:1\n"),
        names: &["servre"],
    },
    BadCase {
        what: "YAML limit that is not a number",
        args: &[],
        env: &[],
        yaml: Some("memory: {global_memory_limit_mb: lots}\n"),
        names: &["memory.global_memory_limit_mb"],
    },
    BadCase {
        what: "allocator scheme that is neither tags nor placement",
        args: &[],
        env: &[("MEMTEL_ALLOC_SCHEME", "tag")],
        yaml: None,
        names: &["MEMTEL_ALLOC_SCHEME", "\"tag\""],
    },
    BadCase {
        what: "--config of a missing file",
        args: &["--config", "/nonexistent.yaml"],
        env: &[],
        yaml: None,
        names: &["--config", "/nonexistent.yaml"],
    },
];

#[test]
fn invalid_settings_exit_2_with_one_line_naming_the_setting() {
    assert!(
        !Path::new("/nonexistent.yaml").exists(),
        "/nonexistent.yaml exists here"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (i, case) in BAD.iter().enumerate() {
        let mut cmd = memtel();
        if let Some(yaml) = case.yaml {
            cmd.arg("--config")
                .arg(write_file(dir.path(), &format!("case{i}.yaml"), yaml));
        }
        cmd.args(case.args);
        // Should validation wrongly pass, the server must not take a fixed port.
        let about_listen = case.args.contains(&"--listen") || case.env.iter().any(|(k, _)| *k == "MEMTEL_LISTEN");
        if !about_listen {
            cmd.arg("--listen").arg(free_addr().to_string());
        }
        for (name, value) in case.env {
            cmd.env(name, value);
        }
        let (status, _, stderr) = run(cmd, case.what);
        let trimmed = stderr.trim();
        let mut problems = Vec::new();
        if status.code() != Some(2) {
            problems.push(format!("exit {status}, expected status 2"));
        }
        for name in case.names {
            if !trimmed.contains(name) {
                problems.push(format!("stderr does not name {name:?}"));
            }
        }
        if trimmed.lines().count() != 1 {
            problems.push(format!("stderr has {} lines, expected 1", trimmed.lines().count()));
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n  stderr: {stderr:?}", case.what, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 2. Precedence: flag > environment > YAML > default.
// ---------------------------------------------------------------------------

#[test]
fn precedence_flag_over_env_over_yaml_over_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client();
    let yaml_addr = free_addr();
    let config = write_file(
        dir.path(),
        "memtel.yaml",
        &format!("server:\n  listen: \"{yaml_addr}\"\nmemory:\n  global_memory_limit_mb: 300\n"),
    );

    struct Run {
        what: &'static str,
        flag_mb: Option<&'static str>,
        env_mb: Option<&'static str>,
        /// Also give the address by flag / by environment; neither means the YAML's address.
        listen_flag: bool,
        listen_env: bool,
        want_mb: u64,
    }
    let runs = [
        Run {
            what: "flag, env and YAML",
            flag_mb: Some("100"),
            env_mb: Some("200"),
            listen_flag: true,
            listen_env: true,
            want_mb: 100,
        },
        Run {
            what: "env and YAML",
            flag_mb: None,
            env_mb: Some("200"),
            listen_flag: false,
            listen_env: true,
            want_mb: 200,
        },
        Run {
            what: "YAML only",
            flag_mb: None,
            env_mb: None,
            listen_flag: false,
            listen_env: false,
            want_mb: 300,
        },
    ];
    for run in runs {
        let mut cmd = memtel();
        cmd.arg("--config").arg(&config).arg("--no-demo");
        if let Some(mb) = run.flag_mb {
            cmd.args(["--limit-mb", mb]);
        }
        if let Some(mb) = run.env_mb {
            cmd.env("MEMTEL_LIMIT_MB", mb);
        }
        // The address the server must answer on: flag > env > YAML, like the limit.
        let mut expect_addr = yaml_addr;
        if run.listen_env {
            let addr = free_addr();
            cmd.env("MEMTEL_LISTEN", addr.to_string());
            expect_addr = addr;
        }
        if run.listen_flag {
            let addr = free_addr();
            cmd.arg("--listen").arg(addr.to_string());
            expect_addr = addr;
        }
        let mut proc = Proc::spawn(cmd, run.what);
        proc.wait_ready(&client, expect_addr);
        let profile = get_json(&client, expect_addr, PROFILE);
        assert_eq!(profile["limit_mb"], run.want_mb, "{}: {profile}", run.what);
        assert_eq!(profile["limit_source"], "configured", "{}: {profile}", run.what);
    }

    // Nothing configured: the default limit comes from the cgroup or the machine.
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.arg("--listen").arg(addr.to_string()).arg("--no-demo");
    let mut proc = Proc::spawn(cmd, "defaults");
    proc.wait_ready(&client, addr);
    let profile = get_json(&client, addr, PROFILE);
    let source = profile["limit_source"].as_str().unwrap_or_default();
    assert!(
        source == "cgroup" || source == "system",
        "default limit source: {profile}"
    );
}

// ---------------------------------------------------------------------------
// 3. The running binary: endpoints, measured RSS, components, 405, SIGTERM.
// ---------------------------------------------------------------------------

#[test]
fn serves_profile_matching_proc_and_exits_0_on_sigterm() {
    let client = client();
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.arg("--listen").arg(addr.to_string());
    let mut proc = Proc::spawn(cmd, "server");
    proc.wait_ready(&client, addr);

    let health = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);

    // The profile's RSS against the kernel's, read just before and just after.
    let before = vm_rss_mib(proc.pid());
    let profile = get_json(&client, addr, PROFILE);
    let after = vm_rss_mib(proc.pid());
    let current = profile["current_usage_mb"]
        .as_f64()
        .unwrap_or_else(|| panic!("current_usage_mb is not a number: {profile}"));
    let (low, high) = (before.min(after), before.max(after));
    let slack = |mb: f64| (mb * 0.10).max(2.0);
    assert!(
        current >= low - slack(low) && current <= high + slack(high),
        "current_usage_mb {current} vs VmRSS {before:.1}..{after:.1} MiB: {profile}"
    );

    let components: BTreeSet<&str> = profile["by_component"]
        .as_object()
        .unwrap_or_else(|| panic!("by_component is not an object: {profile}"))
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = ["api", "browser", "cache", "extraction", "other"].into();
    assert_eq!(components, expected, "{profile}");

    let post = client
        .post(format!("http://{addr}{PROFILE}"))
        .send()
        .expect("POST profile");
    assert_eq!(post.status(), 405);
    let allow = post
        .headers()
        .get(reqwest::header::ALLOW)
        .expect("405 without an Allow header")
        .to_str()
        .expect("Allow header is text");
    assert!(
        allow.split(',').any(|m| m.trim() == "GET"),
        "Allow: {allow:?} does not list GET"
    );

    proc.terminate();
    let status = proc.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGTERM: {status}; stderr:\n{}",
        proc.stderr()
    );
}

// ---------------------------------------------------------------------------
// 4. An address in use.
// ---------------------------------------------------------------------------

#[test]
fn address_in_use_exits_1_with_one_line_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local_addr");
    let mut cmd = memtel();
    cmd.arg("--listen").arg(addr.to_string());
    let (status, _, stderr) = run(cmd, "address in use");
    drop(taken);
    assert_eq!(status.code(), Some(1), "{status}; stderr: {stderr:?}");
    let trimmed = stderr.trim();
    assert_eq!(trimmed.lines().count(), 1, "stderr: {stderr:?}");
    assert!(
        trimmed.contains(&addr.to_string()),
        "stderr does not name {addr}: {stderr:?}"
    );
}

// ---------------------------------------------------------------------------
// 5. A collector that is down: no stall, one rate-limited line.
// ---------------------------------------------------------------------------

/// A "collector" that accepts connections and closes them at once, counting them:
/// every export fails, and the count shows how many were attempted.
struct ClosingCollector {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ClosingCollector {
    fn start() -> ClosingCollector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (Arc::clone(&accepted), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            drop(stream);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        ClosingCollector {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ClosingCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the service exporting to `endpoint` every 200 ms for about 4 s while
/// requesting the profile, stops it with SIGTERM, and returns its stderr.
fn serve_with_failing_exports(protocol: &str, endpoint: &str) -> String {
    let client = client();
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.arg("--listen")
        .arg(addr.to_string())
        .env("OTEL_METRICS_EXPORTER", "otlp")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "500");
    let what = format!("{protocol} exports to {endpoint}");
    let mut proc = Proc::spawn(cmd, what.clone());
    proc.wait_ready(&client, addr);

    let start = Instant::now();
    let mut requests = 0;
    while start.elapsed() < Duration::from_secs(4) {
        let response = client
            .get(format!("http://{addr}{PROFILE}"))
            .send()
            .unwrap_or_else(|e| panic!("{what}: request {requests} failed: {e}; stderr:\n{}", proc.stderr()));
        assert_eq!(response.status(), 200, "{what}: request {requests}");
        requests += 1;
        thread::sleep(Duration::from_millis(50));
    }
    assert!(requests > 0);

    proc.terminate();
    // Shutdown may wait for the last flush (bounded by 5 s in the binary).
    let status = proc.wait_exit(Duration::from_secs(15));
    let stderr = proc.stderr();
    assert_eq!(status.code(), Some(0), "{what}: {status}; stderr:\n{stderr}");
    stderr
}

fn export_error_lines(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.contains("PeriodicReader.ExportError"))
        .count()
}

#[test]
fn dead_collector_http_protobuf_one_rate_limited_line() {
    let endpoint = format!("http://{}", free_addr());
    let stderr = serve_with_failing_exports("http/protobuf", &endpoint);
    assert_eq!(export_error_lines(&stderr), 1, "stderr:\n{stderr}");
}

#[test]
fn dead_collector_grpc_one_rate_limited_line() {
    let endpoint = format!("http://{}", free_addr());
    let stderr = serve_with_failing_exports("grpc", &endpoint);
    assert_eq!(export_error_lines(&stderr), 1, "stderr:\n{stderr}");
}

/// The same with a collector that counts the exports it refuses: many failed, one line.
#[test]
fn refusing_collector_many_failed_exports_one_line() {
    for protocol in ["http/protobuf", "grpc"] {
        let collector = ClosingCollector::start();
        let stderr = serve_with_failing_exports(protocol, &format!("http://{}", collector.addr));
        let attempts = collector.accepted.load(Ordering::Relaxed);
        // ~20 intervals of 200 ms in 4 s; ask for fewer so a busy machine still passes.
        assert!(
            attempts >= 8,
            "{protocol}: only {attempts} export connection(s); stderr:\n{stderr}"
        );
        assert_eq!(export_error_lines(&stderr), 1, "{protocol}: stderr:\n{stderr}");
    }
}

/// SIGTERM with a live collector: the last interval is flushed before exit. The
/// interval is an hour, so the shutdown flush is the only export there is.
fn sigterm_flushes_to_live_collector(grpc: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let receiver = runtime.block_on(async {
        if grpc {
            otlp::OtlpReceiver::start_grpc().await
        } else {
            otlp::OtlpReceiver::start_http().await
        }
    });
    let protocol = if grpc { "grpc" } else { "http/protobuf" };
    let client = client();
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string(), "--limit-mb", "123", "--no-demo"])
        .env("OTEL_METRICS_EXPORTER", "otlp")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_METRIC_EXPORT_INTERVAL", "3600000");
    let mut proc = Proc::spawn(cmd, format!("{protocol} flush at shutdown"));
    proc.wait_ready(&client, addr);
    let pid = proc.pid();
    proc.terminate();
    let status = proc.wait_exit(Duration::from_secs(15));
    let stderr = proc.stderr();
    assert_eq!(status.code(), Some(0), "{protocol}: {status}; stderr:\n{stderr}");

    let points = otlp::points(&receiver.metric_requests());
    let limit = points
        .iter()
        .find(|p| p.metric == "memtel.memory.limit")
        .unwrap_or_else(|| {
            panic!(
                "{protocol}: no memtel.memory.limit received at shutdown ({} points, receiver errors {:?}); stderr:\n{stderr}",
                points.len(),
                receiver.errors()
            )
        });
    assert_eq!(limit.int_value, Some(123 << 20), "{protocol}: {limit:?}");
    assert_eq!(
        limit.attributes.get("memtel.limit.source").map(String::as_str),
        Some("configured")
    );
    assert_eq!(limit.resource.get("process.pid"), Some(&pid.to_string()), "{limit:?}");
    drop(receiver);
}

#[test]
fn sigterm_flushes_last_interval_http_protobuf() {
    sigterm_flushes_to_live_collector(false);
}

#[test]
fn sigterm_flushes_last_interval_grpc() {
    sigterm_flushes_to_live_collector(true);
}

// ---------------------------------------------------------------------------
// 6. --help.
// ---------------------------------------------------------------------------

/// Every `MEMTEL_*` name written in the binary's sources.
fn memtel_vars_in_sources() -> BTreeSet<String> {
    fn walk(dir: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                for (i, _) in text.match_indices("MEMTEL_") {
                    let name: String = text[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if name.len() > "MEMTEL_".len() {
                        found.insert(name);
                    }
                }
            }
        }
    }
    let mut found = BTreeSet::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
    found
}

#[test]
fn help_exits_0_and_lists_every_variable() {
    let (status, stdout, stderr) = run(
        {
            let mut cmd = memtel();
            cmd.arg("--help");
            cmd
        },
        "--help",
    );
    assert_eq!(status.code(), Some(0), "{status}; stderr: {stderr:?}");
    let mut names: BTreeSet<String> = [
        "MEMTEL_CONFIG",
        "MEMTEL_LISTEN",
        "MEMTEL_LIMIT_MB",
        "MEMTEL_WARNING_THRESHOLD",
        "MEMTEL_CRITICAL_THRESHOLD",
        "MEMTEL_DEMO",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    names.extend(memtel_vars_in_sources());
    let missing: Vec<&String> = names.iter().filter(|n| !stdout.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "--help does not mention {missing:?}:\n{stdout}");
}
