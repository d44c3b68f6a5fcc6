//! The real pipeline, end to end: the memtel service → OTLP gRPC and OTLP HTTP → the
//! OpenTelemetry Collector running `collector-config/otel-collector.yaml` (on free ports) → its
//! Prometheus exporter, scraped here and by Debian's Prometheus, queried with PromQL; the
//! agent → gateway path and the vendor config's auth headers with running collectors; every
//! collector config loaded by the real collector; the compose stack's files, and each Grafana
//! panel's query answered by that Prometheus.
//!
//! The collector comes from `$MEMTEL_OTELCOL`, else `scripts/build-collector.sh` builds (or
//! reuses) it; Prometheus from PATH, else `scripts/install-prometheus.sh`. Nothing is skipped.
#![cfg(feature = "service")]

#[path = "support/collector.rs"]
mod collector;
#[path = "support/service.rs"]
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use collector::{
    get_text, http, otelcol, parse_exposition, promql, repo, start_collector, CollectorPorts, Exposition, FakeIntake,
    Guard, CONFIG_VARS,
};
use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use service::{free_addr, get_json, memtel, Proc, PROFILE};

/// Every Prometheus name memtel's instruments get through the collector, and its `# TYPE`.
const NAMES: &[(&str, &str)] = &[
    ("process_memory_usage_bytes", "gauge"),
    ("process_memory_virtual_bytes", "gauge"),
    ("process_memory_utilization_ratio", "gauge"),
    ("memtel_memory_peak_bytes", "gauge"),
    ("memtel_memory_limit_bytes", "gauge"),
    ("memtel_memory_pressure", "gauge"),
    ("memtel_heap_allocated_bytes", "gauge"),
    ("jemalloc_memory_bytes", "gauge"),
    ("jemalloc_fragmentation_ratio", "gauge"),
    ("jemalloc_metadata_overhead_ratio", "gauge"),
    ("memtel_component_usage_bytes", "gauge"),
    ("memtel_component_allocated_bytes_total", "counter"),
    ("memtel_alloc_cache_bytes", "gauge"),
    ("memtel_cleanup_runs_total", "counter"),
    ("memtel_cleanup_freed_bytes_total", "counter"),
    ("memtel_gc_runs_total", "counter"),
    ("memtel_gc_freed_bytes_total", "counter"),
    // The history's trends (the service keeps a history).
    ("memtel_memory_growth_rate_bytes_per_second", "gauge"),
    ("memtel_component_growth_rate_bytes_per_second", "gauge"),
    ("memtel_component_leak_suspected_ratio", "gauge"),
];
/// Present only while resident memory grows toward the limit.
const WHILE_GROWING: &[(&str, &str)] = &[("memtel_memory_time_to_limit_seconds", "gauge")];
/// Present exactly when the JSON has `kernel.psi`.
const PSI_NAMES: &[(&str, &str)] = &[
    ("memtel_psi_stall_time_seconds_total", "counter"),
    ("memtel_psi_pressure_ratio", "gauge"),
];
/// Present exactly when the JSON has `kernel.cgroup.events`.
const CGROUP_NAMES: &[(&str, &str)] = &[("memtel_cgroup_events_total", "counter")];

const MIB: f64 = 1024.0 * 1024.0;
/// The bound on waiting for data to travel through the pipeline.
const ARRIVAL: Duration = Duration::from_secs(90);
/// How many times the values are compared with the JSON before the test gives up.
const VALUE_TRIES: usize = 20;

fn config(name: &str) -> PathBuf {
    repo().join("collector-config").join(name)
}

fn yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// One memtel service exporting to a collector.
struct Leg {
    job: &'static str,
    /// `service.instance.id`, when set (it becomes the `instance` label).
    instance: Option<&'static str>,
    addr: SocketAddr,
    proc: Proc,
}

fn start_memtel(
    job: &'static str,
    protocol: &str,
    endpoint: String,
    instance: Option<&'static str>,
    args: &[&str],
) -> Leg {
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.arg("--listen")
        .arg(addr.to_string())
        .args(args)
        .env("OTEL_METRICS_EXPORTER", "otlp")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_METRIC_EXPORT_INTERVAL", "1000")
        .env("OTEL_SERVICE_NAME", job);
    if let Some(id) = instance {
        cmd.env("OTEL_RESOURCE_ATTRIBUTES", format!("service.instance.id={id}"));
    }
    collector::die_with_parent(&mut cmd);
    let mut proc = Proc::spawn(cmd, job);
    proc.wait_ready(&service::client(), addr);
    Leg {
        job,
        instance,
        addr,
        proc,
    }
}

/// The collector's exposition, fetched until `ready` holds for it (at most [`ARRIVAL`]).
fn scrape_until(
    collector: &mut Guard,
    url: &str,
    what: &str,
    mut ready: impl FnMut(&Exposition) -> Result<(), String>,
) -> Exposition {
    let client = http();
    let start = Instant::now();
    loop {
        collector.assert_running();
        let exposition = parse_exposition(&get_text(&client, url));
        let why = match ready(&exposition) {
            Ok(()) => return exposition,
            Err(why) => why,
        };
        assert!(
            start.elapsed() < ARRIVAL,
            "{what}: not there within {ARRIVAL:?}: {why}\n{} log:\n{}",
            collector.what,
            collector.tail(30)
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// Every required name has a series of `job`.
fn has_all_names(exposition: &Exposition, job: &str) -> Result<(), String> {
    let missing: Vec<&str> = NAMES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| exposition.find(name, &[("job", job)]).is_empty())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("job {job} lacks {missing:?}"))
    }
}

fn label<'a>(sample: &'a collector::Sample, key: &str) -> &'a str {
    sample.labels.get(key).map(String::as_str).unwrap_or_default()
}

/// Names, types and labels of one leg's series, against the contract and the leg's JSON.
fn check_names_and_labels(exposition: &Exposition, leg: &Leg, json: &Json) {
    let job = leg.job;
    let samples: Vec<&collector::Sample> = exposition
        .samples
        .iter()
        // target_info carries the resource, not a measurement: checked on its own.
        .filter(|s| s.labels.get("job").map(String::as_str) == Some(job) && s.name != "target_info")
        .collect();
    let names: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();

    let kernel = &json["kernel"];
    let mut expected: BTreeMap<&str, &str> = NAMES.iter().copied().collect();
    if kernel.get("psi").is_some() {
        expected.extend(PSI_NAMES.iter().copied());
    }
    if kernel["cgroup"]
        .get("events")
        .is_some_and(|e| e.as_object().is_some_and(|o| !o.is_empty()))
    {
        expected.extend(CGROUP_NAMES.iter().copied());
    }
    for (name, kind) in WHILE_GROWING {
        if names.contains(name) {
            expected.insert(name, kind);
        }
    }
    let expected_names: BTreeSet<&str> = expected.keys().copied().collect();
    assert_eq!(
        names, expected_names,
        "{job}: the Prometheus names the collector emits differ from the contract (JSON kernel section: {kernel})"
    );
    for (name, kind) in &expected {
        assert_eq!(
            exposition.types.get(*name).map(String::as_str),
            Some(*kind),
            "{job}: # TYPE of {name}"
        );
    }

    for s in &samples {
        assert_eq!(label(s, "otel_scope_name"), "memtel", "{job}: scope label of {s:?}");
        assert_eq!(
            label(s, "otel_scope_version"),
            env!("CARGO_PKG_VERSION"),
            "{job}: scope version label of {s:?}"
        );
        // service.name is the `job` label; no series carries it under its own name.
        assert!(!s.labels.contains_key("service_name"), "{job}: {s:?}");
        if let Some(instance) = leg.instance {
            assert_eq!(
                label(s, "instance"),
                instance,
                "{job}: service.instance.id → instance on {s:?}"
            );
        }
    }

    // The pressure state set: the three levels, exactly one at 1.
    let pressure = exposition.find("memtel_memory_pressure", &[("job", job)]);
    let levels: BTreeMap<&str, f64> = pressure
        .iter()
        .map(|s| (label(s, "memtel_pressure_level"), s.value))
        .collect();
    assert_eq!(
        levels.keys().copied().collect::<Vec<_>>(),
        ["critical", "normal", "warning"],
        "{job}: {pressure:?}"
    );
    assert_eq!(levels.values().filter(|v| **v == 1.0).count(), 1, "{job}: {levels:?}");
    assert_eq!(levels.values().filter(|v| **v == 0.0).count(), 2, "{job}: {levels:?}");

    let stats: BTreeSet<&str> = exposition
        .find("jemalloc_memory_bytes", &[("job", job)])
        .iter()
        .map(|s| label(s, "jemalloc_stat"))
        .collect();
    assert_eq!(
        stats,
        BTreeSet::from(["active", "allocated", "mapped", "metadata", "resident", "retained"]),
        "{job}: jemalloc_stat values"
    );

    let components: BTreeSet<&str> = exposition
        .find("memtel_component_usage_bytes", &[("job", job)])
        .iter()
        .map(|s| label(s, "memtel_component"))
        .collect();
    let json_components: BTreeSet<&str> = json["by_component"]
        .as_object()
        .expect("by_component")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        components, json_components,
        "{job}: memtel_component values vs the JSON's by_component"
    );

    let limit = exposition.one("memtel_memory_limit_bytes", &[("job", job)]);
    assert_eq!(
        label(limit, "memtel_limit_source"),
        json["limit_source"].as_str().expect("limit_source"),
        "{job}: {limit:?}"
    );
}

/// (what, value through the collector, value in the JSON, absolute slack for the JSON's rounding).
type Figure = (String, f64, f64, f64);

/// The figures of one leg that both views carry, in the JSON's units.
fn figures(exposition: &Exposition, job: &str, json: &Json) -> Result<Vec<Figure>, String> {
    let one = |name: &str, with: &[(&str, &str)]| -> Result<f64, String> {
        let mut labels = vec![("job", job)];
        labels.extend_from_slice(with);
        match exposition.find(name, &labels).as_slice() {
            [s] => Ok(s.value),
            other => Err(format!("{name}{labels:?}: {} samples", other.len())),
        }
    };
    let num = |v: &Json, what: &str| v.as_f64().ok_or_else(|| format!("JSON {what} is {v}"));
    // Integer MB fields are rounded to the nearest MiB; floats to 3 decimals; ratios to 4.
    let mut out: Vec<Figure> = vec![
        (
            "process_memory_usage_bytes vs current_usage_mb".into(),
            one("process_memory_usage_bytes", &[])? / MIB,
            num(&json["current_usage_mb"], "current_usage_mb")?,
            1.0,
        ),
        (
            "memtel_memory_peak_bytes vs peak_usage_mb".into(),
            one("memtel_memory_peak_bytes", &[])? / MIB,
            num(&json["peak_usage_mb"], "peak_usage_mb")?,
            1.0,
        ),
        (
            "memtel_memory_limit_bytes vs limit_mb".into(),
            one("memtel_memory_limit_bytes", &[])? / MIB,
            num(&json["limit_mb"], "limit_mb")?,
            1.0,
        ),
        (
            "memtel_heap_allocated_bytes vs total_allocated_mb".into(),
            one("memtel_heap_allocated_bytes", &[])? / MIB,
            num(&json["total_allocated_mb"], "total_allocated_mb")?,
            1.0,
        ),
        (
            "process_memory_utilization_ratio vs stats.usage_percentage".into(),
            one("process_memory_utilization_ratio", &[])? * 100.0,
            num(&json["stats"]["usage_percentage"], "usage_percentage")?,
            0.01,
        ),
        (
            "jemalloc_fragmentation_ratio vs jemalloc.fragmentation_ratio".into(),
            one("jemalloc_fragmentation_ratio", &[])?,
            num(&json["jemalloc"]["fragmentation_ratio"], "fragmentation_ratio")?,
            0.001,
        ),
    ];
    for stat in ["resident", "allocated", "retained", "active", "mapped", "metadata"] {
        out.push((
            format!("jemalloc_memory_bytes{{jemalloc_stat=\"{stat}\"}} vs jemalloc.{stat}_mb"),
            one("jemalloc_memory_bytes", &[("jemalloc_stat", stat)])? / MIB,
            num(&json["jemalloc"][format!("{stat}_mb")], stat)?,
            0.01,
        ));
    }
    // Moves by a few KiB at a time; the JSON has three decimals.
    out.push((
        "memtel_alloc_cache_bytes vs tracking.cache_mb".into(),
        one("memtel_alloc_cache_bytes", &[])? / MIB,
        num(&json["tracking"]["cache_mb"], "tracking.cache_mb")?,
        0.5,
    ));
    for (component, mb) in json["by_component"].as_object().expect("by_component") {
        out.push((
            format!("memtel_component_usage_bytes{{memtel_component=\"{component}\"}} vs by_component.{component}"),
            one("memtel_component_usage_bytes", &[("memtel_component", component)])? / MIB,
            num(mb, component)?,
            1.0,
        ));
    }
    let level = json["pressure"].as_str().ok_or("JSON pressure")?;
    out.push((
        format!("memtel_memory_pressure{{memtel_pressure_level=\"{level}\"}} (the JSON's level)"),
        one("memtel_memory_pressure", &[("memtel_pressure_level", level)])?,
        1.0,
        0.0,
    ));
    Ok(out)
}

fn agrees(scraped: f64, json: f64, slack: f64) -> bool {
    (scraped - json).abs() <= (0.10 * json.abs()).max(slack)
}

/// Values through the collector agree (10 %) with the JSON read at the moment of the export.
/// The collector shows the last export (up to an interval and a batch old) and the demo workload
/// moves memory by more than 10 % in a second, so the JSON is read every 50 ms meanwhile, and
/// one of the reads of the last few seconds must agree on every figure at once: all callbacks
/// of one export and one JSON response share a snapshot. Retried a bounded number of times.
fn check_values(collector: &mut Guard, metrics_url: &str, leg: &Leg) {
    let stop = AtomicBool::new(false);
    let reads: Mutex<Vec<(Instant, Json)>> = Mutex::new(Vec::new());
    thread::scope(|scope| {
        scope.spawn(|| {
            let client = service::client();
            while !stop.load(Ordering::Relaxed) {
                let json = get_json(&client, leg.addr, PROFILE);
                reads.lock().expect("lock").push((Instant::now(), json));
                thread::sleep(Duration::from_millis(50));
            }
        });
        let outcome = compare_with_reads(collector, metrics_url, leg, &reads);
        stop.store(true, Ordering::Relaxed);
        if let Err(last) = outcome {
            panic!(
                "{}: the collector's values never agreed with a JSON read within 10 % in {VALUE_TRIES} tries; \
                 last scrape vs the nearest read:\n  {last}\nmemtel stderr:\n{}",
                leg.job,
                leg.proc.stderr()
            );
        }
    });
}

fn compare_with_reads(
    collector: &mut Guard,
    metrics_url: &str,
    leg: &Leg,
    reads: &Mutex<Vec<(Instant, Json)>>,
) -> Result<(), String> {
    let client = http();
    let mut last = String::new();
    // Reads from before the scrape, back to two export intervals and a batch timeout.
    let window = Duration::from_millis(2500);
    thread::sleep(window);
    for _ in 0..VALUE_TRIES {
        collector.assert_running();
        let scraped_at = Instant::now();
        let exposition = parse_exposition(&get_text(&client, metrics_url));
        let candidates: Vec<Json> = reads
            .lock()
            .expect("lock")
            .iter()
            .filter(|(at, _)| *at <= scraped_at && scraped_at.duration_since(*at) <= window)
            .map(|(_, json)| json.clone())
            .collect();
        let mut fewest: Option<Vec<String>> = None;
        for json in &candidates {
            let bad: Vec<String> = match figures(&exposition, leg.job, json) {
                Ok(figures) => figures
                    .iter()
                    .filter(|(_, scraped, read, slack)| !agrees(*scraped, *read, *slack))
                    .map(|(what, scraped, read, _)| format!("{what}: {scraped} vs {read}"))
                    .collect(),
                Err(e) => vec![e],
            };
            if bad.is_empty() {
                return Ok(());
            }
            let closer = match &fewest {
                Some(f) => bad.len() < f.len(),
                None => true,
            };
            if closer {
                fewest = Some(bad);
            }
        }
        last = match fewest {
            Some(bad) => bad.join("\n  "),
            None => "no JSON read in the window".to_string(),
        };
        thread::sleep(Duration::from_millis(700));
    }
    Err(last)
}

/// Prometheus started on `prometheus/prometheus.yml`, retargeted at the test collector and
/// scraping every second.
fn start_prometheus(target: SocketAddr, dir: &Path) -> (Guard, SocketAddr) {
    let mut config = yaml(&repo().join("prometheus/prometheus.yml"));
    config["global"]["scrape_interval"] = Yaml::from("1s");
    config["global"]["evaluation_interval"] = Yaml::from("1s");
    let jobs = config["scrape_configs"].as_sequence_mut().expect("scrape_configs");
    assert_eq!(jobs.len(), 1, "prometheus.yml: one scrape job, the collector");
    jobs[0]["static_configs"] = serde_norway::from_str(&format!("[{{targets: ['{target}']}}]")).expect("yaml");
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, serde_norway::to_string(&config).expect("yaml")).expect("write prometheus.yml");

    let addr = free_addr();
    let mut cmd = Command::new(collector::prometheus());
    cmd.arg(format!("--config.file={}", path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .current_dir(dir);
    let mut guard = Guard::spawn(cmd, "prometheus");
    guard.wait_http_ok(&format!("http://{addr}/-/ready"));
    (guard, addr)
}

/// Waits until `query` returns at least one series (at most [`ARRIVAL`]).
fn promql_until(prometheus: &mut Guard, addr: SocketAddr, query: &str) -> Vec<Json> {
    let client = http();
    let start = Instant::now();
    loop {
        prometheus.assert_running();
        let result = promql(&client, addr, query);
        if !result.is_empty() {
            return result;
        }
        assert!(
            start.elapsed() < ARRIVAL,
            "PromQL {query}: no series within {ARRIVAL:?}; prometheus log:\n{}",
            prometheus.tail(30)
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// Every PromQL expression of the provisioned dashboard, with its variables at "All".
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo().join("grafana/dashboards/memtel.json");
    let text = std::fs::read_to_string(&path).expect("read dashboard");
    let dashboard: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let variables: Vec<(String, String)> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| {
            let name = v["name"].as_str().expect("variable name").to_string();
            let all = v["allValue"]
                .as_str()
                .unwrap_or_else(|| panic!("variable {name}: no allValue"));
            (name, all.to_string())
        })
        .collect();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("panel title");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title}: no targets"));
        assert!(!targets.is_empty(), "panel {title}: no targets");
        for target in targets {
            let mut expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title}: a target without expr"))
                .to_string();
            for (name, value) in &variables {
                expr = expr
                    .replace(&format!("${{{name}}}"), value)
                    .replace(&format!("${name}"), value);
            }
            assert!(!expr.contains('$'), "panel {title}: unresolved variable in {expr}");
            out.push((title.to_string(), expr));
        }
    }
    out
}

#[test]
fn memtel_through_the_real_collector_to_prometheus() {
    let dir = tempfile::tempdir().expect("tempdir");

    // The compose stack's collector config, on free ports.
    let main_ports = CollectorPorts::free(free_addr);
    let mut main = start_collector(
        &config("otel-collector.yaml"),
        &main_ports,
        &[],
        "collector (otel-collector.yaml)",
    );
    let metrics_url = format!("http://{}/metrics", main_ports.prometheus);

    // The scale-out path: agent → gateway → (as its backend) the collector above.
    let gateway_ports = CollectorPorts::free(free_addr);
    let gateway = start_collector(
        &config("gateway.yaml"),
        &gateway_ports,
        &[("BACKEND_OTLP_ENDPOINT", format!("http://{}", main_ports.http))],
        "gateway (gateway.yaml)",
    );
    let agent_ports = CollectorPorts::free(free_addr);
    let agent = start_collector(
        &config("agent.yaml"),
        &agent_ports,
        &[("GATEWAY_OTLP_ENDPOINT", format!("http://{}", gateway_ports.http))],
        "agent (agent.yaml)",
    );

    // A vendor's intake, stood in for by a local server that records the headers.
    let intake = FakeIntake::start();
    let vendor_ports = CollectorPorts::free(free_addr);
    let vendor = start_collector(
        &config("vendor-otlp.yaml"),
        &vendor_ports,
        &[
            ("VENDOR_OTLP_ENDPOINT", format!("http://{}", intake.addr)),
            (
                "VENDOR_OTLP_HEADERS",
                "{Authorization: \"Bearer test-token\", x-honeycomb-team: test-key}".to_string(),
            ),
        ],
        "vendor collector (vendor-otlp.yaml)",
    );

    // gRPC, with service.instance.id; HTTP, with a limit memtel is far over (pressure critical).
    let grpc = start_memtel(
        "memtel-grpc",
        "grpc",
        format!("http://{}", main_ports.grpc),
        Some("memtel-grpc-0"),
        &[],
    );
    let http_leg = start_memtel(
        "memtel-http",
        "http/protobuf",
        format!("http://{}", main_ports.http),
        None,
        &["--limit-mb", "32"],
    );
    let via_agent = start_memtel(
        "memtel-agent",
        "grpc",
        format!("http://{}", agent_ports.grpc),
        None,
        &["--no-demo"],
    );
    let _to_vendor = start_memtel(
        "memtel-vendor",
        "http/protobuf",
        format!("http://{}", vendor_ports.http),
        None,
        &["--no-demo"],
    );

    // Leg 1: the collector's Prometheus exporter.
    let exposition = scrape_until(&mut main, &metrics_url, "every series of the three services", |e| {
        has_all_names(e, grpc.job)?;
        has_all_names(e, http_leg.job)?;
        has_all_names(e, via_agent.job)?;
        if e.find(
            "memtel_component_usage_bytes",
            &[("job", grpc.job), ("memtel_component", "cache")],
        )
        .is_empty()
        {
            return Err("no cache component yet".into());
        }
        Ok(())
    });
    for leg in [&grpc, &http_leg, &via_agent] {
        let json = get_json(&service::client(), leg.addr, PROFILE);
        check_names_and_labels(&exposition, leg, &json);
    }
    assert!(!exposition
        .find(
            "memtel_component_usage_bytes",
            &[("job", grpc.job), ("memtel_component", "cache")]
        )
        .is_empty());
    assert_eq!(
        exposition
            .one(
                "memtel_memory_pressure",
                &[("job", http_leg.job), ("memtel_pressure_level", "critical")]
            )
            .value,
        1.0,
        "32 MB limit: critical"
    );
    // With service.instance.id the other resource attributes arrive as target_info.
    let info = exposition.one("target_info", &[("job", grpc.job), ("instance", "memtel-grpc-0")]);
    assert_eq!(label(info, "process_pid"), grpc.proc.pid().to_string(), "{info:?}");
    assert_eq!(label(info, "service_version"), env!("CARGO_PKG_VERSION"), "{info:?}");

    check_values(&mut main, &metrics_url, &grpc);
    check_values(&mut main, &metrics_url, &http_leg);
    check_values(&mut main, &metrics_url, &via_agent);

    // The vendor config sends the headers from VENDOR_OTLP_HEADERS with every request.
    let start = Instant::now();
    let request = loop {
        let requests = intake.requests();
        if let Some(r) = requests.iter().find(|r| r.path == "/v1/metrics") {
            break r.clone();
        }
        assert!(
            start.elapsed() < ARRIVAL,
            "the vendor collector sent no /v1/metrics within {ARRIVAL:?} (requests: {requests:?}); log:\n{}",
            vendor.tail(30)
        );
        thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(request.method, "POST", "{request:?}");
    assert_eq!(
        request.headers.get("authorization").map(String::as_str),
        Some("Bearer test-token")
    );
    assert_eq!(
        request.headers.get("x-honeycomb-team").map(String::as_str),
        Some("test-key")
    );
    assert_eq!(
        request.headers.get("content-type").map(String::as_str),
        Some("application/x-protobuf")
    );
    assert!(request.body_len > 0, "{request:?}");

    // Leg 2: Prometheus scrapes the collector, PromQL finds the series with their own labels.
    let (mut prometheus, prom_addr) = start_prometheus(main_ports.prometheus, dir.path());
    for leg in [&grpc, &http_leg, &via_agent] {
        let query = format!("process_memory_usage_bytes{{job=\"{}\"}}", leg.job);
        let result = promql_until(&mut prometheus, prom_addr, &query);
        assert_eq!(result.len(), 1, "{query}: {result:?}");
        let metric = &result[0]["metric"];
        assert_eq!(
            metric["job"], leg.job,
            "honor_labels keeps the collector's job: {metric}"
        );
        assert!(metric.get("exported_job").is_none(), "{metric}");
        if let Some(instance) = leg.instance {
            assert_eq!(metric["instance"], instance, "{metric}");
        }
    }
    let one_level = promql_until(
        &mut prometheus,
        prom_addr,
        "count by (job) (memtel_memory_pressure{job=~\"memtel-.*\"} == 1)",
    );
    for series in &one_level {
        assert_eq!(series["value"][1], "1", "one level at 1 per service: {series}");
    }
    let critical = promql_until(
        &mut prometheus,
        prom_addr,
        "memtel_memory_pressure{job=\"memtel-http\", memtel_pressure_level=\"critical\"} == 1",
    );
    assert_eq!(critical.len(), 1, "{critical:?}");
    let cache = promql_until(
        &mut prometheus,
        prom_addr,
        "memtel_component_usage_bytes{job=\"memtel-grpc\", memtel_component=\"cache\"}",
    );
    assert_eq!(cache.len(), 1, "{cache:?}");

    // Every panel of the provisioned dashboard gets data from this Prometheus.
    for (title, expr) in dashboard_queries() {
        let result = promql_until(&mut prometheus, prom_addr, &expr);
        assert!(!result.is_empty(), "panel {title}: {expr}");
    }

    for guard in [&mut main, &mut prometheus] {
        guard.assert_running();
    }
    drop((agent, gateway, vendor));
}

#[test]
fn every_collector_config_is_loaded_by_the_real_collector() {
    let dir = repo().join("collector-config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("collector-config")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in ["agent.yaml", "gateway.yaml", "otel-collector.yaml", "vendor-otlp.yaml"] {
        assert!(
            names.iter().any(|n| n == required),
            "collector-config/{required} is missing"
        );
    }

    let ports = CollectorPorts::free(free_addr);
    let mut env = ports.env();
    env.extend([
        ("GATEWAY_OTLP_ENDPOINT", "http://127.0.0.1:4318".to_string()),
        ("BACKEND_OTLP_ENDPOINT", "http://127.0.0.1:4318".to_string()),
        ("BACKEND_OTLP_HEADERS", "{Authorization: \"Bearer x\"}".to_string()),
        ("VENDOR_OTLP_ENDPOINT", "https://otlp.example.com".to_string()),
        ("VENDOR_OTLP_HEADERS", "{x-honeycomb-team: key}".to_string()),
    ]);
    for file in &files {
        let (ok, out) = validate(file, &env);
        assert!(ok, "otelcol validate --config {}:\n{out}", file.display());

        // memory_limiter first in every pipeline, batch after it.
        let config = yaml(file);
        let pipelines = config["service"]["pipelines"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{}: no pipelines", file.display()));
        for (name, pipeline) in pipelines {
            let processors: Vec<&str> = pipeline["processors"]
                .as_sequence()
                .unwrap_or_else(|| panic!("{}: pipeline {name:?} without processors", file.display()))
                .iter()
                .map(|p| p.as_str().expect("processor name"))
                .collect();
            assert_eq!(
                processors.first(),
                Some(&"memory_limiter"),
                "{}: {name:?}",
                file.display()
            );
            assert!(processors.contains(&"batch"), "{}: {name:?}", file.display());
        }
    }

    // The collector does reject what is wrong: a required setting left out, a broken config.
    let without_backend: Vec<_> = env
        .iter()
        .filter(|(k, _)| *k != "BACKEND_OTLP_ENDPOINT")
        .cloned()
        .collect();
    let (ok, out) = validate(&config("gateway.yaml"), &without_backend);
    assert!(
        !ok && out.contains("otlp_http/backend"),
        "gateway.yaml without BACKEND_OTLP_ENDPOINT:\n{out}"
    );

    let text = std::fs::read_to_string(config("otel-collector.yaml")).expect("read");
    let broken = text.replacen(
        "processors: [memory_limiter, batch]",
        "processors: [memory_limiter, batchh]",
        1,
    );
    assert_ne!(
        broken, text,
        "otel-collector.yaml: the pipeline line to break was not found"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("broken.yaml");
    std::fs::write(&path, broken).expect("write");
    let (ok, out) = validate(&path, &env);
    assert!(
        !ok && out.contains("batchh"),
        "a pipeline naming an undefined processor:\n{out}"
    );
}

/// `otelcol validate --config FILE`: whether it passed, and what it said.
fn validate(file: &Path, env: &[(&str, String)]) -> (bool, String) {
    let mut cmd = Command::new(otelcol());
    cmd.arg("validate").arg("--config").arg(file);
    for name in CONFIG_VARS {
        cmd.env_remove(name);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    let out = cmd.output().expect("run otelcol validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn compose_stack_references_only_files_that_exist() {
    let root = repo();
    let compose = yaml(&root.join("docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    let service_names: BTreeSet<&str> = services.keys().map(|k| k.as_str().expect("service name")).collect();
    assert_eq!(
        service_names,
        BTreeSet::from(["grafana", "memtel", "otel-collector", "prometheus"])
    );

    // Every bind mount's source exists; remember where each lands in its container.
    let mut mounts: BTreeMap<(String, String), String> = BTreeMap::new();
    for (name, svc) in services {
        let name = name.as_str().expect("name");
        for volume in svc["volumes"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            let spec = volume.as_str().expect("short volume syntax");
            let mut parts = spec.split(':');
            let (source, target) = (parts.next().expect("source"), parts.next().expect("target"));
            if source.starts_with("./") {
                assert!(root.join(source).exists(), "{name}: {source} does not exist");
                mounts.insert((name.to_string(), source.to_string()), target.to_string());
            }
        }
    }

    // memtel builds from the Dockerfile, whose COPY sources exist.
    let memtel = &compose["services"]["memtel"];
    let context = memtel["build"].as_str().expect("memtel: build: <context>");
    let dockerfile = root.join(context).join("Dockerfile");
    let text = std::fs::read_to_string(&dockerfile).expect("Dockerfile");
    let mut copies = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        for source in &words[..words.len() - 1] {
            assert!(
                root.join(context).join(source).exists(),
                "Dockerfile: {line}: {source} missing"
            );
            copies += 1;
        }
    }
    assert!(copies > 0, "Dockerfile copies nothing");

    // The collector runs the tested config, at the release the tests build.
    let collector = &compose["services"]["otel-collector"];
    assert_eq!(
        mounts
            .get(&("otel-collector".into(), "./collector-config/otel-collector.yaml".into()))
            .map(String::as_str),
        Some("/etc/otelcol/config.yaml")
    );
    let image = collector["image"].as_str().expect("image");
    let go_mod = std::fs::read_to_string(root.join("tests/collector/go.mod")).expect("go.mod");
    let contrib = go_mod
        .lines()
        .find(|l| l.contains("opentelemetry-collector-contrib/exporter/prometheusexporter "))
        .and_then(|l| l.split_whitespace().last())
        .expect("contrib version in go.mod");
    assert_eq!(
        image,
        format!(
            "otel/opentelemetry-collector-contrib:{}",
            contrib.trim_start_matches('v')
        )
    );

    // memtel → collector :4317 (gRPC) → exporter :8889 ← Prometheus, as the configs say.
    let env = &memtel["environment"];
    assert_eq!(
        env["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str(),
        Some("http://otel-collector:4317")
    );
    assert_eq!(env["OTEL_EXPORTER_OTLP_PROTOCOL"].as_str(), Some("grpc"));
    let otel = std::fs::read_to_string(config("otel-collector.yaml")).expect("read");
    assert!(
        otel.contains(":-0.0.0.0:4317}"),
        "otel-collector.yaml: gRPC default :4317"
    );
    assert!(
        otel.contains(":-0.0.0.0:8889}"),
        "otel-collector.yaml: exporter default :8889"
    );
    let prometheus = yaml(&root.join("prometheus/prometheus.yml"));
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(
        job["honor_labels"].as_bool(),
        Some(true),
        "keep the collector's job/instance labels"
    );
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some("otel-collector:8889")
    );
    let promtool = collector::prometheus().with_file_name("promtool");
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(root.join("prometheus/prometheus.yml"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", promtool.display()));
    assert!(out.status.success(), "promtool check config: {out:?}");

    // Grafana: the data source is that Prometheus; the provider's path is where the dashboards are mounted.
    let datasources = yaml(&root.join("grafana/provisioning/datasources/prometheus.yml"));
    let ds = &datasources["datasources"][0];
    assert_eq!(ds["type"].as_str(), Some("prometheus"));
    assert_eq!(ds["url"].as_str(), Some("http://prometheus:9090"));
    let uid = ds["uid"].as_str().expect("datasource uid");
    let providers = yaml(&root.join("grafana/provisioning/dashboards/memtel.yml"));
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path");
    assert_eq!(
        mounts
            .get(&("grafana".into(), "./grafana/dashboards".into()))
            .map(String::as_str),
        Some(path)
    );
    assert_eq!(
        mounts
            .get(&("grafana".into(), "./grafana/provisioning".into()))
            .map(String::as_str),
        Some("/etc/grafana/provisioning")
    );
    let dashboard: Json =
        serde_json::from_str(&std::fs::read_to_string(root.join("grafana/dashboards/memtel.json")).expect("dashboard"))
            .expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 5, "dashboard panels: {}", panels.len());
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some(uid),
            "panel {}",
            panel["title"]
        );
    }
    let queries = dashboard_queries();
    for wanted in [
        "process_memory_usage_bytes",
        "memtel_memory_limit_bytes",
        "memtel_memory_pressure",
        "memtel_component_usage_bytes",
        "jemalloc_memory_bytes",
        "jemalloc_fragmentation_ratio",
    ] {
        assert!(
            queries.iter().any(|(_, q)| q.contains(wanted)),
            "no panel queries {wanted}"
        );
    }
}

/// memtel's own `/metrics`, without a collector: the names and types the collector gives
/// (the same lists as above), accepted by `promtool check metrics`, values equal to the JSON
/// read at the same moment (1 %), and Prometheus scraping it directly answers every query of
/// the provisioned dashboard.
#[test]
fn prometheus_scrapes_memtel_directly() {
    let addr = free_addr();
    let mut cmd = memtel();
    // No rate limit: the values are compared over up to a hundred quick pairs of requests.
    cmd.args([
        "--listen",
        &addr.to_string(),
        "--history-interval",
        "1s",
        "--rate-limit",
        "0",
    ])
    .env("OTEL_SDK_DISABLED", "true");
    collector::die_with_parent(&mut cmd);
    let mut proc = Proc::spawn(cmd, "memtel serving /metrics");
    let client = service::client();
    proc.wait_ready(&client, addr);
    thread::sleep(Duration::from_secs(2));

    // Names and types: the collector's.
    let text = get_text(&http(), &format!("http://{addr}/metrics"));
    let exposition = parse_exposition(&text);
    let json = get_json(&client, addr, PROFILE);
    let mut expected: BTreeMap<&str, &str> = NAMES.iter().copied().collect();
    if json["kernel"].get("psi").is_some() {
        expected.extend(PSI_NAMES.iter().copied());
    }
    if json["kernel"]["cgroup"]
        .get("events")
        .is_some_and(|e| e.as_object().is_some_and(|o| !o.is_empty()))
    {
        expected.extend(CGROUP_NAMES.iter().copied());
    }
    let names: BTreeSet<&str> = exposition.samples.iter().map(|s| s.name.as_str()).collect();
    for (name, kind) in WHILE_GROWING {
        if names.contains(name) {
            expected.insert(name, kind);
        }
    }
    assert_eq!(
        names,
        expected.keys().copied().collect::<BTreeSet<_>>(),
        "/metrics names"
    );
    for (name, kind) in &expected {
        assert_eq!(
            exposition.types.get(*name).map(String::as_str),
            Some(*kind),
            "# TYPE of {name}"
        );
    }
    for s in &exposition.samples {
        assert_eq!(
            s.labels.get("otel_scope_name").map(String::as_str),
            Some("memtel"),
            "{s:?}"
        );
    }

    // promtool accepts it.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-prometheus.sh)");
    std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), text.as_bytes()).expect("write");
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Values equal the JSON read at the same moment: the two share a snapshot when they are
    // read within its 5 ms window, so retry until a pair does (1 %, or the JSON's rounding).
    let mut last = String::new();
    let agreed = (0..VALUE_TRIES * 5).any(|_| {
        let text = get_text(&http(), &format!("http://{addr}/metrics"));
        let json = get_json(&client, addr, PROFILE);
        let mut exposition = parse_exposition(&text);
        for s in &mut exposition.samples {
            s.labels.insert("job".into(), "direct".into());
        }
        match figures(&exposition, "direct", &json) {
            Ok(figures) => {
                let off: Vec<String> = figures
                    .iter()
                    .filter(|(_, scraped, json, slack)| (scraped - json).abs() > (0.01 * json.abs()).max(*slack))
                    .map(|(what, scraped, json, _)| format!("{what}: {scraped} vs {json}"))
                    .collect();
                last = off.join("; ");
                off.is_empty()
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(agreed, "/metrics never agreed with the JSON within 1 %: {last}");

    // Prometheus scrapes it and every dashboard panel gets data.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut prometheus, prom_addr) = start_prometheus(addr, dir.path());
    for (title, expr) in dashboard_queries() {
        let result = promql_until(&mut prometheus, prom_addr, &expr);
        assert!(!result.is_empty(), "panel {title}: {expr}");
    }
    prometheus.assert_running();
    proc.terminate();
}
