//! The service binary acting on pressure: a tight limit run where the demo cache grows
//! into warning and the cleanup brings it back, and a real cgroup v1 limit detected.
#![cfg(all(feature = "service", target_os = "linux"))]

#[path = "support/service.rs"]
mod service;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use service::*;

/// The episodes and cleanups in the log, in order: `E` entering pressure from normal,
/// `C` a cleanup run, `N` back to normal.
fn sequence(stderr: &str) -> String {
    stderr
        .lines()
        .filter_map(|line| {
            if line.contains("memtel::pressure") && line.contains("from=normal") {
                Some('E')
            } else if line.contains("cleanup ran") {
                Some('C')
            } else if line.contains("memory pressure eased") && line.contains("level=normal") {
                Some('N')
            } else {
                None
            }
        })
        .collect()
}

fn freed_bytes(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("cleanup ran"))
        .filter_map(|l| l.split("freed_bytes=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn tight_limit_cleans_up_once_per_episode_and_recovers() {
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string()])
        .args(["--limit-mb", "150", "--gc-trigger-mb", "100"])
        .args(["--cooldown", "2s", "--check-interval", "200ms"]);
    let mut proc = Proc::spawn(cmd, "memtel with a tight limit");
    let client = client();
    proc.wait_ready(&client, addr);

    let mut seen = Vec::new();
    let mut cache_peak = 0u64;
    let start = Instant::now();
    let last: Value = loop {
        let doc = get_json(&client, addr, "/api/v1/memory/profile");
        let level = doc["pressure"].as_str().unwrap().to_owned();
        if seen.last() != Some(&level) {
            seen.push(level);
        }
        cache_peak = cache_peak.max(doc["by_component"]["cache"].as_u64().unwrap_or(0));
        let episodes_done = doc["stats"]["cleanup_count"].as_u64().unwrap_or(0) >= 2 && seen.len() >= 3;
        if episodes_done && doc["pressure"] == "normal" {
            break doc;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no two episodes within 60 s: seen {seen:?}, {doc}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    proc.terminate();
    assert!(proc.wait_exit(Duration::from_secs(15)).success());
    let stderr = proc.stderr();

    // Pressure rose, the hook fired, the level came back.
    assert!(seen.iter().any(|l| l != "normal"), "never left normal: {seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("normal"));
    let events = sequence(&stderr);
    assert!(events.matches('E').count() >= 2, "two episodes: {events}\n{stderr}");
    // Exactly one cleanup per episode: every cleanup follows an entry, never another cleanup.
    let mut in_episode = false;
    let mut cleaned = false;
    for e in events.chars() {
        match e {
            'E' => (in_episode, cleaned) = (true, false),
            'C' => {
                assert!(in_episode && !cleaned, "a second cleanup in one episode: {events}");
                cleaned = true;
            }
            _ => in_episode = false,
        }
    }
    assert_eq!(
        last["stats"]["cleanup_count"].as_u64(),
        Some(events.matches('C').count() as u64)
    );
    assert!(
        last["stats"]["last_cleanup_secs_ago"].as_u64().is_some_and(|s| s < 30),
        "{last}"
    );
    assert!(last["stats"]["gc_count"].as_u64().is_some_and(|n| n >= 1), "{last}");
    assert!(last["stats"]["last_gc_secs_ago"].as_u64().is_some(), "{last}");

    // The cleanup freed a measured amount: most of the cache.
    let freed = freed_bytes(&stderr);
    assert!(cache_peak >= 20, "the cache grew: peak {cache_peak} MB");
    assert!(
        freed.iter().all(|f| *f >= 16 << 20),
        "each cleanup freed at least 16 MB of heap: {freed:?}"
    );
}

/// The v1 memory hierarchy's mount point and this process's group in it, read the
/// way an administrator would.
fn own_v1_memory_group() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut right = right.split_whitespace();
            let (fstype, options) = (right.next()?, right.nth(1)?);
            (fstype == "cgroup" && options.split(',').any(|o| o == "memory"))
                .then(|| left.split_whitespace().nth(4).unwrap().to_owned())
        })
        .expect("a cgroup v1 memory hierarchy is mounted (this machine kind has one)");
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = membership
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "memory").then(|| path.to_owned())
        })
        .expect("this process is in a memory cgroup");
    PathBuf::from(mount).join(path.trim_start_matches('/'))
}

/// A child memory group, removed when dropped.
struct Group(PathBuf);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_cgroup_v1_limit_is_detected_with_source_cgroup() {
    let group = Group(own_v1_memory_group().join(format!("memtel-test-{}", std::process::id())));
    std::fs::create_dir(&group.0).unwrap_or_else(|e| panic!("create {} (needs root): {e}", group.0.display()));
    let limit: u64 = 256 << 20;
    std::fs::write(group.0.join("memory.limit_in_bytes"), limit.to_string()).unwrap();

    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string(), "--no-demo"]);
    let procs = std::ffi::CString::new(group.0.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: between fork and exec the child only calls open/write/close, which are
    // async-signal-safe; "0" moves the writing process itself.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut proc = Proc::spawn(cmd, "memtel in a cgroup v1 group");
    let client = client();
    proc.wait_ready(&client, addr);

    // The kernel says the child is in the group.
    let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", proc.pid())).unwrap();
    let name = group.0.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(membership.contains(&name), "{membership}");

    let doc = get_json(&client, addr, "/api/v1/memory/profile");
    assert_eq!(doc["limit_source"], "cgroup", "{doc}");
    assert_eq!(doc["limit_mb"], 256, "{doc}");
    let cgroup = &doc["kernel"]["cgroup"];
    assert_eq!(cgroup["version"], 1, "{doc}");
    assert!(cgroup["path"].as_str().unwrap().ends_with(&name), "{doc}");
    assert_eq!(cgroup["limit_mb"], 256);
    assert!(
        cgroup["events"]["oom_kill"].is_u64(),
        "v1 oom_kill from memory.oom_control: {doc}"
    );
    assert!(cgroup["events"]["max"].is_u64(), "v1 failcnt as max: {doc}");

    proc.terminate();
    assert!(proc.wait_exit(Duration::from_secs(15)).success());
}

/// `ru_maxrss` survives `exec`: a child of a parent that holds a lot of memory starts
/// with the parent's peak. The reported peak must be the child's own (its VmHWM).
#[test]
fn the_peak_is_the_processs_own_not_the_parents() {
    // Hold and touch 256 MB so this process's peak is far above the child's.
    let ballast = vec![1u8; 256 << 20];
    assert!(vm_rss_mib(std::process::id()) > 200.0);
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string(), "--no-demo"]);
    let mut proc = Proc::spawn(cmd, "memtel started by a large parent");
    let client = client();
    proc.wait_ready(&client, addr);
    let status = std::fs::read_to_string(format!("/proc/{}/status", proc.pid())).unwrap();
    let hwm_mb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0;
    let doc = get_json(&client, addr, "/api/v1/memory/profile");
    let peak = doc["peak_usage_mb"].as_f64().unwrap();
    assert!(peak < 150.0, "not the parent's peak: {peak} MB");
    assert!(
        (peak - hwm_mb).abs() <= hwm_mb * 0.2 + 2.0,
        "peak {peak} MB vs the child's VmHWM {hwm_mb} MB"
    );
    proc.terminate();
    assert!(proc.wait_exit(Duration::from_secs(15)).success());
    drop(ballast);
}
