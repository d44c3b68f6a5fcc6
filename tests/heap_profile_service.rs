//! The service's heap profile route: absent by default; with `--debug-endpoints` a
//! gzipped pprof profile `go tool pprof` reads, a flamegraph SVG, folded stacks, one
//! component's samples, and a delta over `seconds=2`.
#![cfg(all(feature = "service", target_os = "linux"))]

#[path = "support/pprof.rs"]
mod pprof;
#[path = "support/service.rs"]
mod service;

use std::time::Duration;

use pprof::go_pprof;
use service::*;

const HEAP: &str = "/debug/pprof/heap";

fn get(client: &reqwest::blocking::Client, addr: std::net::SocketAddr, query: &str) -> (u16, Vec<u8>) {
    let response = client
        .get(format!("http://{addr}{HEAP}{query}"))
        .timeout(Duration::from_secs(30))
        .send()
        .expect("request");
    let status = response.status().as_u16();
    (status, response.bytes().expect("body").to_vec())
}

/// The service with `args`, ready, exporting nothing.
fn start(args: &[&str], what: &str) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string()])
        .args(args)
        .env("OTEL_SDK_DISABLED", "true");
    let mut proc = Proc::spawn(cmd, what);
    proc.wait_ready(&client(), addr);
    (proc, addr)
}

#[test]
fn debug_routes_are_off_unless_asked_for() {
    let (proc, addr) = start(&[], "memtel without --debug-endpoints");
    assert_eq!(get(&client(), addr, "").0, 404);
    proc.terminate();
}

#[test]
fn the_heap_profile_is_served_in_every_format() {
    let (proc, addr) = start(
        &["--debug-endpoints", "--heap-profile-sample", "64KiB"],
        "memtel --debug-endpoints",
    );
    let client = client();
    // The demo's components fill up.
    std::thread::sleep(Duration::from_secs(8));

    let (status, body) = get(&client, addr, "");
    assert_eq!(status, 200);
    assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("heap.pb.gz");
    std::fs::write(&file, &body).expect("write");
    let top = go_pprof(&["-top", "-sample_index=inuse_space"], &file);
    // The demo's allocations come from its step function, with its components as labels.
    assert!(top.contains("demo::step"), "{top}");
    let tags = go_pprof(&["-tags"], &file);
    for component in ["cache", "browser", "extraction"] {
        assert!(tags.contains(component), "{component} not among the labels:\n{tags}");
    }

    let (status, svg) = get(&client, addr, "?format=svg");
    assert_eq!(status, 200);
    let svg = String::from_utf8(svg).expect("utf-8");
    assert!(svg.starts_with("<?xml") && svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));

    let (status, folded) = get(&client, addr, "?format=folded&component=cache");
    assert_eq!(status, 200);
    let folded = String::from_utf8(folded).expect("utf-8");
    assert!(!folded.trim().is_empty());
    for line in folded.lines() {
        assert!(line.starts_with("component=cache;"), "{line}");
        let bytes: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|b| b.parse().ok())
            .expect("a byte count");
        assert!(bytes > 0);
    }

    // Two seconds of the demo: its cache takes 1 MiB every 100 ms, about 20 MiB.
    let (status, delta) = get(&client, addr, "?seconds=2&component=cache&format=folded");
    assert_eq!(status, 200);
    let delta = String::from_utf8(delta).expect("utf-8");
    let (status, delta_pb) = get(&client, addr, "?seconds=2&component=cache");
    assert_eq!(status, 200);
    std::fs::write(&file, &delta_pb).expect("write");
    let alloc = go_pprof(&["-top", "-sample_index=alloc_space"], &file);
    let total = total_mb(&alloc).unwrap_or_else(|| panic!("no total in\n{alloc}"));
    assert!(
        (10.0..=40.0).contains(&total),
        "the cache allocated {total} MB in 2 s:\n{alloc}\n{delta}"
    );

    // The pools: every component arena, with its size classes.
    let pools = get_json(&client, addr, "/debug/memory/pools");
    let arenas = pools["arenas"].as_array().expect("arenas");
    let cache = arenas
        .iter()
        .find(|a| a["component"] == "cache")
        .unwrap_or_else(|| panic!("no arena for cache: {pools}"));
    let classes = cache["classes"].as_array().expect("classes");
    assert!(!classes.is_empty());
    for class in classes {
        let (live, held) = (
            class["live_bytes"].as_u64().unwrap(),
            class["held_bytes"].as_u64().unwrap(),
        );
        assert!(live <= held, "{class}");
    }

    for (query, status) in [("?format=png", 400), ("?seconds=0", 400), ("?depth=3", 400)] {
        assert_eq!(get(&client, addr, query).0, status, "{query}");
    }
    proc.terminate();
}

#[test]
fn sampling_off_says_how_to_turn_it_on() {
    let (proc, addr) = start(
        &["--debug-endpoints", "--heap-profile-sample", "0"],
        "memtel with sampling off",
    );
    let (status, body) = get(&client(), addr, "");
    assert_eq!(status, 409);
    let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--heap-profile-sample")),
        "{body}"
    );
    proc.terminate();
}

/// The `Showing nodes accounting for X MB` total of `go tool pprof -top`.
fn total_mb(top: &str) -> Option<f64> {
    let line = top.lines().find(|l| l.contains("of ") && l.contains("total"))?;
    let total = line.split(" of ").nth(1)?.split_whitespace().next()?;
    let (number, unit) = total.split_at(total.find(|c: char| c.is_ascii_alphabetic())?);
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "GB" => value * 1024.0,
        "MB" => value,
        "kB" => value / 1024.0,
        "B" => value / 1_048_576.0,
        _ => return None,
    })
}
