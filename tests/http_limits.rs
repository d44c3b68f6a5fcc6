//! Bounded cost under abuse, with the service binary: a burst from one client gets 429 with
//! `Retry-After` and a JSON error while `/healthz` stays 200; the expensive routes are
//! limited more tightly; clients that connect and send nothing, or send a request slowly,
//! do not keep others from being served; request bodies are refused.
#![cfg(all(feature = "service", target_os = "linux"))]

#[path = "support/service.rs"]
mod service;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use service::*;

fn start(args: &[&str]) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string(), "--no-demo"])
        .args(args)
        .env("OTEL_SDK_DISABLED", "true");
    let mut proc = Proc::spawn(cmd, format!("memtel {args:?}"));
    proc.wait_ready(&client(), addr);
    (proc, addr)
}

#[test]
fn a_burst_gets_429_with_retry_after_and_healthz_stays_open() {
    let (proc, addr) = start(&["--rate-limit", "20"]);
    let client = client();
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..120 {
        let response = client
            .get(format!("http://{addr}/api/v1/memory/profile"))
            .send()
            .expect("request");
        statuses.push(response.status().as_u16());
        if response.status() == 429 && limited.is_none() {
            let retry = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let body: serde_json::Value = serde_json::from_str(&response.text().expect("body")).expect("a JSON error");
            limited = Some((retry, body));
        }
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let (retry, body) = limited.unwrap_or_else(|| panic!("no 429 in a burst of 120: {statuses:?}"));
    assert!(retry.is_some_and(|r| r >= 1), "Retry-After: {retry:?}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("rate limit")),
        "{body}"
    );
    // The burst allowance (twice the rate) and what refilled meanwhile.
    assert!((30..=100).contains(&ok), "{ok} of 120 served: {statuses:?}");
    for _ in 0..20 {
        let health = client.get(format!("http://{addr}/healthz")).send().expect("healthz");
        assert_eq!(health.status(), 200, "/healthz is never limited");
    }
    // The history allows a tenth: 2 per second, bursts of 4.
    let history: Vec<u16> = (0..12)
        .map(|_| {
            client
                .get(format!("http://{addr}/api/v1/memory/profile/history?window=10s"))
                .send()
                .expect("request")
                .status()
                .as_u16()
        })
        .collect();
    assert!(history.iter().filter(|&&s| s == 200).count() <= 6, "{history:?}");
    assert!(history.contains(&429), "{history:?}");
    proc.terminate();
}

#[test]
fn stuck_and_slow_clients_do_not_starve_the_others() {
    let (proc, addr) = start(&[]);
    // 300 connections that never send a byte, and 50 that send half a request line.
    let mut idle: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    for stream in idle.iter_mut().take(50) {
        stream
            .write_all(b"GET /api/v1/memory/profile HTTP/1.1\r\nHost: x")
            .expect("write");
    }
    let client = client();
    let start = Instant::now();
    for _ in 0..10 {
        for path in ["/healthz", "/api/v1/memory/profile", "/metrics"] {
            let response = client
                .get(format!("http://{addr}{path}"))
                .timeout(Duration::from_secs(5))
                .send()
                .unwrap_or_else(|e| panic!("{path} with 350 stuck clients: {e}"));
            assert_eq!(response.status(), 200, "{path}");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    drop(idle);
    // A request body is refused.
    let response = client
        .post(format!("http://{addr}/api/v1/memory/profile"))
        .body(vec![b'x'; 1 << 20])
        .send()
        .expect("post");
    assert!(
        [405, 413].contains(&response.status().as_u16()),
        "{}",
        response.status()
    );
    // On every route, the open ones included. The body is announced and held back until the
    // server asks for it (`Expect: 100-continue`): a body sent at once and left unread when
    // the server answers and closes makes the kernel reset the connection, and the answer
    // can be lost with it.
    for path in ["/healthz", "/memory", "/api/v1/memory/profile", "/metrics"] {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\nExpect: 100-continue\r\n\r\n"
        )
        .expect("write");
        let mut head = [0u8; 12];
        std::io::Read::read_exact(&mut stream, &mut head).expect("a status line");
        assert_eq!(
            &head,
            b"HTTP/1.1 413",
            "GET {path} announcing a body: {}",
            String::from_utf8_lossy(&head)
        );
    }
    proc.terminate();
}
