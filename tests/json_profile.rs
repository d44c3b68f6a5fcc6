//! The JSON view over a real socket, checked against the kernel's and jemalloc's own figures.
#![cfg(all(feature = "http", feature = "jemalloc"))]

#[path = "support/http.rs"]
mod http;
#[path = "support/process.rs"]
mod process;

use std::sync::Mutex;
use std::time::Duration;

use memtel::{MemoryMonitor, Thresholds, PROFILE_PATH};
use process::{rel_diff, MIB};
use serde_json::Value;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Tests here compare process-wide figures: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn num(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// The profile route of a monitor with a 4 GiB limit and one reported component, `cache`,
/// of 3 MiB.
fn cache_of_3_mb_under_4_gb() -> http::TestServer {
    let monitor = MemoryMonitor::builder().limit_bytes(4 << 30).build();
    monitor.component("cache", || 3 << 20).unwrap();
    http::TestServer::start(memtel::router(monitor))
}

#[test]
fn every_documented_field_with_its_type() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let server = cache_of_3_mb_under_4_gb();
    let doc = server.get_json(&client(), PROFILE_PATH);

    let timestamp = doc["timestamp"].as_str().expect("timestamp is a string");
    assert!(timestamp.ends_with('Z'), "UTC: {timestamp}");
    let parsed = humantime::parse_rfc3339(timestamp).expect("RFC 3339");
    let age = std::time::SystemTime::now().duration_since(parsed).unwrap();
    assert!(age < Duration::from_secs(60), "timestamp is now: {timestamp}");

    for field in ["total_allocated_mb", "peak_usage_mb", "current_usage_mb", "limit_mb"] {
        assert!(doc[field].is_u64(), "{field} is an integer: {}", doc[field]);
    }
    assert_eq!(doc["limit_mb"], 4096);
    assert_eq!(doc["limit_source"], "configured");
    assert_eq!(doc["by_component"]["cache"], 3);
    assert!(doc["by_component"]["other"].is_u64());
    assert_eq!(doc["by_component"].as_object().unwrap().len(), 2);
    assert_eq!(doc["by_component_source"], "reported");
    assert_eq!(doc["pressure"], "normal");

    let stats = &doc["stats"];
    assert!(stats["usage_percentage"].is_f64() || stats["usage_percentage"].is_u64());
    assert_eq!(stats["is_under_pressure"], false);
    assert_eq!(stats["last_cleanup_secs_ago"], Value::Null);
    assert_eq!(stats["last_gc_secs_ago"], Value::Null);
    assert_eq!(stats["cleanup_count"], 0);
    assert_eq!(stats["gc_count"], 0);
    assert_eq!(stats["thresholds"]["warning"], 0.8, "the default thresholds");
    assert_eq!(stats["thresholds"]["critical"], 0.9);

    let j = &doc["jemalloc"];
    for field in [
        "allocated_mb",
        "active_mb",
        "resident_mb",
        "metadata_mb",
        "mapped_mb",
        "retained_mb",
        "fragmentation_ratio",
        "metadata_overhead_ratio",
    ] {
        assert!(j[field].is_number(), "jemalloc.{field} is a number: {}", j[field]);
    }
    assert!(j["stats_age_ms"].is_u64());
    // jemalloc's own invariants hold for what we report.
    let (allocated, active, resident, mapped) = (
        num(j, "/allocated_mb"),
        num(j, "/active_mb"),
        num(j, "/resident_mb"),
        num(j, "/mapped_mb"),
    );
    assert!(
        allocated <= active && active <= resident.max(active) && active <= mapped,
        "{j}"
    );
}

#[test]
fn figures_agree_with_the_kernel_and_jemalloc() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Hold some memory so the figures are far from zero.
    let ballast = vec![7u8; 32 << 20];
    let server = http::TestServer::start(memtel::router(MemoryMonitor::new()));
    let client = client();

    let rss_before = process::vm_rss();
    let (allocated_before, _) = process::jemalloc_allocated_resident();
    let doc = server.get_json(&client, PROFILE_PATH);
    let rss_after = process::vm_rss();
    let (allocated_after, _) = process::jemalloc_allocated_resident();

    let current = num(&doc, "/current_usage_mb") * MIB;
    process::assert_within_rss(current, rss_before, rss_after);
    assert!(num(&doc, "/peak_usage_mb") >= num(&doc, "/current_usage_mb"), "{doc}");
    let vm_hwm = process::status_kb("VmHWM") as f64;
    assert!(
        num(&doc, "/peak_usage_mb") * MIB <= vm_hwm + MIB,
        "peak is this process's, not an inherited one: {doc}, VmHWM {vm_hwm}"
    );

    let allocated = num(&doc, "/jemalloc/allocated_mb") * MIB;
    let truth = (allocated_before + allocated_after) as f64 / 2.0;
    assert!(
        rel_diff(allocated, truth) < 0.05,
        "allocated {allocated} vs jemalloc {truth}"
    );
    assert!(allocated >= ballast.len() as f64);
    assert_eq!(num(&doc, "/total_allocated_mb"), (allocated / MIB).round());

    let (resident, ratio) = (
        num(&doc, "/jemalloc/resident_mb"),
        num(&doc, "/jemalloc/fragmentation_ratio"),
    );
    let expected = resident / num(&doc, "/jemalloc/allocated_mb");
    assert!(
        (ratio - expected).abs() < 1e-3,
        "fragmentation {ratio} vs resident/allocated {expected}"
    );
    let overhead = num(&doc, "/jemalloc/metadata_overhead_ratio");
    let expected = num(&doc, "/jemalloc/metadata_mb") / num(&doc, "/jemalloc/allocated_mb");
    assert!(
        (overhead - expected).abs() < 1e-3,
        "metadata overhead {overhead} vs {expected}"
    );
    drop(ballast);
}

/// The pressure level at utilizations around each threshold, with the limit set so
/// that RSS lands where each case needs it.
#[test]
fn pressure_levels_around_each_threshold() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let client = client();
    // Not the defaults (0.80, 0.90), so `stats.thresholds` shows the monitor's own.
    let (warning, critical) = (0.80, 0.95);
    // The first server and request of the process map memory that later ones reuse.
    let warm_up = http::TestServer::start(memtel::router(MemoryMonitor::new()));
    warm_up.get_json(&client, PROFILE_PATH);
    for target in [0.70, 0.77, 0.83, 0.87, 0.91, 0.98, 1.20] {
        let limit = (process::vm_rss() as f64 / target) as u64;
        let monitor = MemoryMonitor::builder()
            .limit_bytes(limit)
            .thresholds(Thresholds::new(warning, critical).unwrap())
            .build();
        let server = http::TestServer::start(memtel::router(monitor));
        let doc = server.get_json(&client, PROFILE_PATH);
        let usage = num(&doc, "/stats/usage_percentage") / 100.0;
        assert!(
            (usage - target).abs() < 0.02,
            "case {target}: usage {usage} landed elsewhere"
        );
        let expected = if usage >= critical {
            "critical"
        } else if usage >= warning {
            "warning"
        } else {
            "normal"
        };
        assert_eq!(doc["pressure"], expected, "usage {usage}: {doc}");
        assert_eq!(doc["stats"]["thresholds"]["warning"], warning);
        assert_eq!(doc["stats"]["thresholds"]["critical"], critical);
        assert_eq!(doc["stats"]["is_under_pressure"], expected != "normal");
        // current_usage_mb and limit_mb are rounded to whole MB.
        let current_from_usage = usage * num(&doc, "/limit_mb");
        assert!(
            (num(&doc, "/current_usage_mb") - current_from_usage).abs() <= 1.0,
            "usage_percentage matches current/limit: {doc}"
        );
    }
}

#[test]
fn other_methods_are_refused_with_allow() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let server = http::TestServer::start(memtel::router(MemoryMonitor::new()));
    let client = client();
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
    ] {
        let response = client.request(method.clone(), server.url(PROFILE_PATH)).send().unwrap();
        assert_eq!(response.status(), 405, "{method}");
        let allow = response.headers()["allow"].to_str().unwrap().to_owned();
        assert!(allow.contains("GET"), "{method}: Allow {allow}");
        let body: Value = serde_json::from_str(&response.text().unwrap()).unwrap();
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }
    let head = client.head(server.url(PROFILE_PATH)).send().unwrap();
    assert_eq!(head.status(), 200);
    let missing = client.get(server.url("/api/v1/memory/nope")).send().unwrap();
    assert_eq!(missing.status(), 404);
}

/// The kernel section against the kernel's own files, read in the test.
#[test]
fn kernel_section_matches_the_kernel_files() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let server = http::TestServer::start(memtel::router(MemoryMonitor::new()));
    let before = std::fs::read_to_string("/proc/pressure/memory").ok();
    let doc = server.get_json(&client(), PROFILE_PATH);
    let after = std::fs::read_to_string("/proc/pressure/memory").ok();
    let kernel = &doc["kernel"];
    assert!(kernel.is_object(), "{doc}");
    let total = |text: &str, kind: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(kind)).unwrap();
        let us: f64 = line.split("total=").nth(1).unwrap().trim().parse().unwrap();
        us / 1e6
    };
    match (before, after) {
        (Some(before), Some(after)) if kernel["psi"]["source"] == "system" => {
            for kind in ["some", "full"] {
                let reported = num(kernel, &format!("/psi/{kind}/total_secs"));
                assert!(
                    total(&before, kind) <= reported + 1e-6 && reported <= total(&after, kind) + 1e-6,
                    "{kind} total {reported} between the file's before and after"
                );
            }
        }
        (Some(_), Some(_)) => assert_eq!(kernel["psi"]["source"], "cgroup", "{doc}"),
        _ => assert!(kernel.get("psi").is_none(), "no PSI file, no psi field: {doc}"),
    }
    if std::fs::read_to_string("/proc/self/cgroup").is_ok_and(|c| c.contains(":memory:")) {
        assert_eq!(kernel["cgroup"]["version"], 1, "{doc}");
    }
}

#[test]
fn a_client_that_accepts_gzip_gets_the_same_document_gzipped() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let server = cache_of_3_mb_under_4_gb();
    let client = client();
    let response = client
        .get(server.url(PROFILE_PATH))
        .header("accept-encoding", "br;q=1.0, gzip;q=0.8")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(headers["vary"], "accept-encoding");
    let compressed = response.bytes().unwrap();
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&compressed[..]), &mut json).expect("gzip");
    let gzipped: Value = serde_json::from_slice(&json).expect("JSON inside");
    // Read plainly right after: the same fields, the same component figures.
    let plain = client.get(server.url(PROFILE_PATH)).send().unwrap();
    assert_eq!(plain.headers().get("content-encoding"), None);
    let plain: Value = plain.json().unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&gzipped), keys(&plain));
    assert_eq!(gzipped["by_component"]["cache"], 3);
    assert_eq!(gzipped["limit_mb"], plain["limit_mb"]);
    // Refused gzip is not sent.
    let refused = client
        .get(server.url(PROFILE_PATH))
        .header("accept-encoding", "gzip;q=0")
        .send()
        .unwrap();
    assert_eq!(refused.headers().get("content-encoding"), None);
}
