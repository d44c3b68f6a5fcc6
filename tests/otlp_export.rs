//! memtel's instruments exported over real OTLP (gRPC and HTTP/protobuf) into
//! in-process receivers, decoded, and checked against the contract and the kernel.
#![cfg(all(feature = "service", feature = "jemalloc"))]

#[path = "support/otlp.rs"]
mod otlp;
#[path = "support/process.rs"]
mod process;

use std::collections::{BTreeMap, BTreeSet};

use memtel::{Instrument, MemoryMonitor, METRICS};
use otlp::{Kind, OtlpReceiver, Point};
use process::rel_diff;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The metrics contract of ARCHITECTURE.md: name, kind, unit, attribute keys, and
/// when it is exported (always, or only where its source exists).
const CONTRACT: &[(&str, &str, &str, &[&str], When)] = &[
    ("process.memory.usage", "updown", "By", &[], When::Always),
    ("process.memory.virtual", "updown", "By", &[], When::Always),
    ("memtel.memory.peak", "gauge_int", "By", &[], When::Always),
    (
        "memtel.memory.limit",
        "updown",
        "By",
        &["memtel.limit.source"],
        When::Always,
    ),
    ("process.memory.utilization", "gauge_double", "1", &[], When::Always),
    (
        "memtel.memory.pressure",
        "updown",
        "1",
        &["memtel.pressure.level"],
        When::Always,
    ),
    ("memtel.heap.allocated", "updown", "By", &[], When::Always),
    ("jemalloc.memory", "updown", "By", &["jemalloc.stat"], When::Always),
    ("jemalloc.fragmentation", "gauge_double", "1", &[], When::Always),
    ("jemalloc.metadata.overhead", "gauge_double", "1", &[], When::Always),
    (
        "memtel.component.usage",
        "updown",
        "By",
        &["memtel.component"],
        When::Always,
    ),
    (
        "memtel.component.allocated",
        "counter_int",
        "By",
        &["memtel.component"],
        When::Tracking,
    ),
    ("memtel.alloc.cache", "updown", "By", &[], When::Tracking),
    ("memtel.cleanup.runs", "counter_int", "{run}", &[], When::Always),
    ("memtel.cleanup.freed", "counter_int", "By", &[], When::Always),
    ("memtel.gc.runs", "counter_int", "{run}", &[], When::Always),
    ("memtel.gc.freed", "counter_int", "By", &[], When::Always),
    (
        "memtel.psi.stall.time",
        "counter_double",
        "s",
        &["memtel.psi.scope"],
        When::Psi,
    ),
    (
        "memtel.psi.pressure",
        "gauge_double",
        "1",
        &["memtel.psi.scope", "memtel.psi.window"],
        When::Psi,
    ),
    (
        "memtel.cgroup.events",
        "counter_int",
        "{event}",
        &["memtel.cgroup.event"],
        When::Cgroup,
    ),
    ("memtel.memory.growth_rate", "gauge_double", "By/s", &[], When::History),
    ("memtel.memory.time_to_limit", "gauge_double", "s", &[], When::History),
    (
        "memtel.component.growth_rate",
        "gauge_double",
        "By/s",
        &["memtel.component"],
        When::History,
    ),
    (
        "memtel.component.leak_suspected",
        "gauge_int",
        "1",
        &["memtel.component"],
        When::History,
    ),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    Always,
    /// Only with the tracking allocator installed (not in this test binary).
    Tracking,
    /// Where /proc/pressure/memory is readable.
    Psi,
    /// Where the process's memory cgroup has event files.
    Cgroup,
    /// Only from a monitor with a history (none here: tests/history_service.rs checks
    /// them as the service exports them).
    History,
}

/// Whether this machine provides a conditional metric's source, read independently.
fn provided(when: When) -> bool {
    match when {
        When::Always => true,
        When::Tracking | When::History => false,
        When::Psi => std::fs::read_to_string("/proc/pressure/memory").is_ok_and(|t| t.starts_with("some ")),
        When::Cgroup => {
            let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let v1 = cgroup.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers.split(',').any(|c| c == "memory").then(|| path.to_owned())
            });
            v1.is_some_and(|path| {
                std::path::Path::new("/sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join("memory.oom_control")
                    .exists()
            }) || std::path::Path::new("/sys/fs/cgroup/memory.events").exists()
        }
    }
}

const LIMIT: u64 = 8 << 30;
const KNOWN: usize = 5 << 20;

/// Tests here compare process-wide figures: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn first_export(receiver: &OtlpReceiver) -> Vec<Point> {
    let requests = receiver.metric_requests();
    assert!(!requests.is_empty(), "the receiver decoded no export");
    otlp::points(&requests[..1])
}

fn named<'a>(points: &'a [Point], name: &str) -> Vec<&'a Point> {
    let found = otlp::points_named(points, name);
    assert!(!found.is_empty(), "{name} was not exported");
    found
}

fn single(points: &[Point], name: &str) -> f64 {
    let found = named(points, name);
    assert_eq!(found.len(), 1, "{name} has one data point");
    found[0].value
}

fn by_attribute(points: &[Point], name: &str, key: &str) -> BTreeMap<String, f64> {
    named(points, name)
        .into_iter()
        .map(|p| (p.attributes[key].clone(), p.value))
        .collect()
}

async fn check_contract(receiver: OtlpReceiver) {
    let _serial = SERIAL.lock().await;
    let monitor = MemoryMonitor::builder().limit_bytes(LIMIT).build();
    let known = std::sync::Arc::new(vec![1u8; KNOWN]);
    let held = known.clone();
    monitor.component("known", move || held.capacity() as u64).unwrap();
    let rss_before = process::vm_rss();
    receiver.export_monitor(monitor).await;
    let rss_after = process::vm_rss();
    let points = first_export(&receiver);

    // Exactly the contract's instruments, with kind, unit, description and attributes.
    let exported: BTreeSet<&str> = points.iter().map(|p| p.metric.as_str()).collect();
    let contract: BTreeSet<&str> = CONTRACT.iter().filter(|c| provided(c.4)).map(|c| c.0).collect();
    assert_eq!(exported, contract);
    let table: BTreeSet<&str> = METRICS.iter().map(|d| d.name).collect();
    assert_eq!(
        table,
        CONTRACT.iter().map(|c| c.0).collect(),
        "the code's table is the contract"
    );
    for (name, kind, unit, attribute, when) in CONTRACT {
        let def = METRICS.iter().find(|d| d.name == *name).expect("in the code's table");
        if !provided(*when) {
            continue;
        }
        for p in named(&points, name) {
            let expected_kind = match *kind {
                "updown" => Kind::Sum { monotonic: false },
                "counter_int" | "counter_double" => Kind::Sum { monotonic: true },
                _ => Kind::Gauge,
            };
            assert_eq!(p.kind, expected_kind, "{name} kind");
            let integer = !kind.ends_with("double");
            assert_eq!(p.int_value.is_some(), integer, "{name} number type");
            assert_eq!(&p.unit, unit, "{name} unit");
            assert!(
                !p.description.is_empty() && p.description == def.description,
                "{name} description"
            );
            let keys: Vec<&str> = p.attributes.keys().map(String::as_str).collect();
            let mut expected: Vec<&str> = attribute.to_vec();
            expected.sort();
            assert_eq!(keys, expected, "{name} attributes");
            assert_eq!(p.scope_name, "memtel");
            assert_eq!(p.scope_version, env!("CARGO_PKG_VERSION"));
            assert_eq!(p.resource["service.name"], "memtel-test");
        }
        let table_kind = match def.instrument {
            Instrument::UpDownCounterI64 => "updown",
            Instrument::GaugeI64 => "gauge_int",
            Instrument::GaugeF64 => "gauge_double",
            Instrument::CounterU64 => "counter_int",
            Instrument::CounterF64 => "counter_double",
            _ => "other",
        };
        assert_eq!(table_kind, *kind, "{name} in the code's table");
    }

    // Values against independent truths.
    let usage = single(&points, "process.memory.usage");
    process::assert_within_rss(usage, rss_before, rss_after);
    let limits = by_attribute(&points, "memtel.memory.limit", "memtel.limit.source");
    assert_eq!(limits, BTreeMap::from([("configured".to_owned(), LIMIT as f64)]));
    let utilization = single(&points, "process.memory.utilization");
    assert!(
        rel_diff(utilization, usage / LIMIT as f64) < 1e-6,
        "utilization {utilization} = usage/limit {} within one export",
        usage / LIMIT as f64
    );
    assert!(single(&points, "memtel.memory.peak") >= usage);
    assert!(single(&points, "process.memory.virtual") >= usage);

    let levels = by_attribute(&points, "memtel.memory.pressure", "memtel.pressure.level");
    assert_eq!(
        levels.keys().map(String::as_str).collect::<Vec<_>>(),
        ["critical", "normal", "warning"]
    );
    assert_eq!(
        levels.values().filter(|v| **v == 1.0).count(),
        1,
        "exactly one level at 1: {levels:?}"
    );
    assert_eq!(levels["normal"], 1.0, "utilization {utilization} is normal");

    let stats = by_attribute(&points, "jemalloc.memory", "jemalloc.stat");
    let stat_names: Vec<&str> = stats.keys().map(String::as_str).collect();
    assert_eq!(
        stat_names,
        ["active", "allocated", "mapped", "metadata", "resident", "retained"]
    );
    assert_eq!(single(&points, "memtel.heap.allocated"), stats["allocated"]);
    let fragmentation = single(&points, "jemalloc.fragmentation");
    assert!(rel_diff(fragmentation, stats["resident"] / stats["allocated"]) < 1e-9);
    let overhead = single(&points, "jemalloc.metadata.overhead");
    assert!(rel_diff(overhead, stats["metadata"] / stats["allocated"]) < 1e-9);

    let components = by_attribute(&points, "memtel.component.usage", "memtel.component");
    assert_eq!(components["known"], known.capacity() as f64);
    assert!(
        stats["allocated"] >= KNOWN as f64,
        "the known bytes are in jemalloc's heap"
    );
    assert_eq!(components["other"], stats["allocated"] - KNOWN as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_carries_the_contract() {
    check_contract(OtlpReceiver::start_grpc().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_carries_the_contract() {
    check_contract(OtlpReceiver::start_http().await).await;
}

/// A limit below RSS puts the process in `critical`: the state set says so alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pressure_state_set_follows_the_level() {
    let _serial = SERIAL.lock().await;
    let receiver = OtlpReceiver::start_grpc().await;
    let tiny_limit = process::vm_rss() / 2;
    receiver
        .export_monitor(MemoryMonitor::builder().limit_bytes(tiny_limit).build())
        .await;
    let points = first_export(&receiver);
    let levels = by_attribute(&points, "memtel.memory.pressure", "memtel.pressure.level");
    assert_eq!(levels["critical"], 1.0, "{levels:?}");
    assert_eq!(levels["warning"] + levels["normal"], 0.0, "{levels:?}");
    assert!(single(&points, "process.memory.utilization") > 1.0);
}
