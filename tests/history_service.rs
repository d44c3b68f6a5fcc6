//! The service binary's history, time-compressed (`--history-interval 100ms`, so the
//! default trend window is 36 s): the demo leak is found in `cache` and only there, at its
//! injected rate, and exported over OTLP with the same values; without it nothing is
//! flagged; the history route's samples match the interval and its steps the raw samples.
#![cfg(all(feature = "service", target_os = "linux"))]

#[path = "support/otlp.rs"]
mod otlp;
#[path = "support/service.rs"]
mod service;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use service::*;

const HISTORY: &str = "/api/v1/memory/profile/history";
const TRENDS: &str = "/api/v1/memory/profile/trends";
const LEAK_MB_PER_MIN: f64 = 240.0;
const LIMIT_MB: f64 = 8192.0;
/// The demo's warm-up (its cache fills in 6.4 s) plus one trend window (360 × 100 ms).
const SETTLE: Duration = Duration::from_secs(46);

fn start(leak: Option<f64>, otlp_endpoint: Option<&str>) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string(), "--history-interval", "100ms"])
        .args(["--limit-mb", &LIMIT_MB.to_string()]);
    if let Some(mb) = leak {
        cmd.args(["--demo-leak-mb-per-min", &mb.to_string()]);
    }
    match otlp_endpoint {
        Some(endpoint) => {
            cmd.env("OTEL_METRICS_EXPORTER", "otlp")
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
                .env("OTEL_METRIC_EXPORT_INTERVAL", "1000");
        }
        None => {
            cmd.env("OTEL_SDK_DISABLED", "true");
        }
    }
    let mut proc = Proc::spawn(cmd, format!("memtel with demo leak {leak:?}"));
    proc.wait_ready(&client(), addr);
    (proc, addr)
}

fn flagged(trends: &Value) -> Vec<String> {
    let mut names: Vec<String> = trends["trends"]["by_component"]
        .as_object()
        .expect("by_component")
        .iter()
        .filter(|(_, t)| t["leak_suspected"] == true)
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    names
}

#[test]
fn the_demo_leak_is_found_in_cache_only_at_its_rate_and_exported() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let receiver = runtime.block_on(otlp::OtlpReceiver::start_http());
    let (proc, addr) = start(Some(LEAK_MB_PER_MIN), Some(&receiver.endpoint()));
    let client = client();
    std::thread::sleep(SETTLE);
    let trends = get_json(&client, addr, TRENDS);
    let t = &trends["trends"];
    // 360 intervals of 100 ms; a tick delayed under load may leave one or two out.
    let samples = t["samples"].as_u64().expect("samples");
    assert!((355..=361).contains(&samples), "{samples} samples in the window: {t}");
    assert_eq!(
        flagged(&trends),
        ["cache"],
        "only cache leaks: {t}\nstderr:\n{}",
        proc.stderr()
    );
    let anomalies: Vec<&str> = trends["anomalies"]
        .as_array()
        .expect("anomalies")
        .iter()
        .map(|a| a["component"].as_str().expect("component"))
        .collect();
    assert_eq!(anomalies, ["cache"], "{}", trends["anomalies"]);
    assert_eq!(t["anomalies_detected"], true);
    let injected = LEAK_MB_PER_MIN * 60.0;
    let rate = t["by_component"]["cache"]["growth_rate_mb_per_hour"]
        .as_f64()
        .expect("rate");
    assert!(
        (rate / injected - 1.0).abs() <= 0.20,
        "cache grows {rate} MB/h, injected {injected}"
    );
    let usage = trends["current"]["current_usage_mb"].as_f64().expect("usage");
    let expected_hours = (LIMIT_MB - usage) / injected;
    let projected = t["projected_exhaustion_hours"]
        .as_f64()
        .expect("projected while growing");
    assert!(
        (projected / expected_hours - 1.0).abs() <= 0.25,
        "projected {projected} h, (limit − usage) ÷ rate = {expected_hours} h"
    );
    let recommendations = trends["recommendations"].as_array().expect("recommendations");
    assert!(
        recommendations
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains("`cache`"))),
        "{recommendations:?}"
    );

    // The export of the next second carries the same judgement.
    let since = Instant::now();
    let points = loop {
        let points = otlp::last_export_points(&receiver.metric_requests());
        if !points.is_empty() && since.elapsed() > Duration::from_millis(1500) {
            break points;
        }
        assert!(since.elapsed() < Duration::from_secs(10), "no export received");
        std::thread::sleep(Duration::from_millis(100));
    };
    let of = |metric: &str, component: Option<&str>| -> f64 {
        points
            .iter()
            .find(|p| p.metric == metric && p.attributes.get("memtel.component").map(String::as_str) == component)
            .unwrap_or_else(|| panic!("{metric} {component:?} not exported"))
            .value
    };
    for name in ["api", "browser", "cache", "extraction", "other"] {
        let expected = f64::from(u8::from(name == "cache"));
        assert_eq!(of("memtel.component.leak_suspected", Some(name)), expected, "{name}");
    }
    let exported = of("memtel.component.growth_rate", Some("cache")) * 3600.0 / 1_048_576.0;
    assert!(
        (exported / rate - 1.0).abs() <= 0.10,
        "exported {exported} MB/h, document {rate}"
    );
    let growth = of("memtel.memory.growth_rate", None) * 3600.0 / 1_048_576.0;
    let documented = t["growth_rate_mb_per_hour"].as_f64().expect("growth");
    assert!(
        (growth / documented - 1.0).abs() <= 0.10,
        "exported {growth} MB/h, document {documented}"
    );
    let ttl_hours = of("memtel.memory.time_to_limit", None) / 3600.0;
    assert!(
        (ttl_hours / projected - 1.0).abs() <= 0.10,
        "exported {ttl_hours} h, document {projected}"
    );
    // The warning the service logs when a leak becomes suspected.
    let stderr = proc.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("memory leak suspected") && l.contains("component=\"cache\"")),
        "no leak warning for cache in stderr:\n{stderr}"
    );
    proc.terminate();
}

#[test]
fn without_a_leak_nothing_is_flagged_and_the_history_matches_its_interval() {
    let (proc, addr) = start(None, None);
    let client = client();
    std::thread::sleep(SETTLE);
    let trends = get_json(&client, addr, TRENDS);
    let t = &trends["trends"];
    assert_eq!(
        flagged(&trends),
        Vec::<String>::new(),
        "{t}\nstderr:\n{}",
        proc.stderr()
    );
    assert_eq!(trends["anomalies"], serde_json::json!([]));
    assert_eq!(t["projected_exhaustion_hours"], Value::Null, "{t}");

    // 10 s of 100 ms samples: 100 of them, 100 ms apart.
    let raw = get_json(&client, addr, &format!("{HISTORY}?window=12s"));
    let recent = get_json(&client, addr, &format!("{HISTORY}?window=10s"));
    assert_eq!(recent["interval_secs"], 0.1);
    let samples = recent["samples"].as_array().expect("samples");
    assert!((98..=101).contains(&samples.len()), "{} samples in 10 s", samples.len());
    let times: Vec<f64> = samples.iter().map(|s| seconds(&s["timestamp"])).collect();
    let mut gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    assert!((median - 0.1).abs() < 0.01, "median spacing {median} s");
    assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first");

    // 1 s steps: each the mean of the raw samples of its second.
    let stepped = get_json(&client, addr, &format!("{HISTORY}?window=10s&step=1s"));
    assert_eq!(stepped["interval_secs"], 1.0);
    let raw: Vec<&Value> = raw["samples"].as_array().expect("raw").iter().collect();
    let steps = stepped["samples"].as_array().expect("steps");
    assert!(steps.len() >= 9, "{} steps", steps.len());
    let mut checked = 0;
    // The newest step may hold a sample recorded after the raw request: leave it out.
    for step in &steps[..steps.len() - 1] {
        let start = seconds(&step["timestamp"]);
        let inside: Vec<&&Value> = raw
            .iter()
            .filter(|s| (start..start + 1.0).contains(&seconds(&s["timestamp"])))
            .collect();
        if inside.len() as u64 != step["samples"].as_u64().expect("count") {
            continue; // a second partly outside the raw window
        }
        for field in ["current_usage_mb", "total_allocated_mb"] {
            let mean = inside.iter().map(|s| s[field].as_f64().expect(field)).sum::<f64>() / inside.len() as f64;
            let got = step[field].as_f64().expect(field);
            assert!(
                (got - mean).abs() <= 0.002,
                "{field} at {start}: step {got}, raw mean {mean}"
            );
        }
        let cache = inside
            .iter()
            .map(|s| s["by_component"]["cache"].as_f64().expect("cache"))
            .sum::<f64>()
            / inside.len() as f64;
        assert!((step["by_component"]["cache"].as_f64().expect("cache") - cache).abs() <= 0.002);
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} steps checked against raw samples");

    // Bad parameters: 400, and the error names the parameter.
    for (query, parameter) in [
        ("window=abc", "window"),
        ("window=0s", "window"),
        ("window=100h", "window"),
        ("window=1h&step=2h", "step"),
        ("window=10s&step=10ms", "step"),
        ("step=x", "step"),
        ("size=3", "size"),
    ] {
        let response = client
            .get(format!("http://{addr}{HISTORY}?{query}"))
            .send()
            .expect("request");
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = serde_json::from_str(&response.text().expect("body")).expect("JSON error");
        let error = body["error"].as_str().expect("error");
        assert!(error.starts_with(&format!("{parameter}:")), "{query}: {error}");
    }
    let response = client
        .get(format!("http://{addr}{TRENDS}?window=soon"))
        .send()
        .expect("request");
    assert_eq!(response.status(), 400);
    proc.terminate();
}

fn seconds(timestamp: &Value) -> f64 {
    let text = timestamp.as_str().expect("timestamp");
    let at: SystemTime = humantime::parse_rfc3339(text).expect("RFC 3339");
    at.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}
