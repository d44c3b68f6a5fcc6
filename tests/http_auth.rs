//! Bearer-token authentication in the service binary: every data route answers 401 without
//! the token and 200 with it, `/healthz` stays open, the token never reaches the logs, and
//! `/debug/*` on a non-loopback address without a token is refused at start.
#![cfg(all(feature = "service", target_os = "linux"))]

#[path = "support/service.rs"]
mod service;

use std::time::Duration;

use service::*;

const TOKEN: &str = "tok-3f9c1a7e5d2b4c68";
const DATA_ROUTES: [&str; 6] = [
    "/api/v1/memory/profile",
    "/api/v1/memory/profile/history",
    "/api/v1/memory/profile/trends",
    "/debug/pprof/heap?format=folded",
    "/debug/memory/pools",
    "/api/v1/memory/profile/history?window=1s",
];

#[test]
fn every_data_route_needs_the_token_and_healthz_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = write_file(dir.path(), "token", &format!("{TOKEN}\n"));
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args([
        "--listen",
        &addr.to_string(),
        "--debug-endpoints",
        "--history-interval",
        "100ms",
    ])
    .arg("--auth-token-file")
    .arg(&token_file)
    .env("OTEL_SDK_DISABLED", "true")
    .env("RUST_LOG", "trace");
    let mut proc = Proc::spawn(cmd, "memtel with a token");
    let client = client();
    proc.wait_ready(&client, addr);
    std::thread::sleep(Duration::from_secs(1));

    let health = client.get(format!("http://{addr}/healthz")).send().expect("healthz");
    assert_eq!(health.status(), 200, "/healthz is always open");
    for route in DATA_ROUTES {
        let url = format!("http://{addr}{route}");
        for auth in [
            None,
            Some("Bearer wrong-token"),
            Some("Basic dG9rOnRvaw=="),
            Some(TOKEN),
        ] {
            let mut request = client.get(&url);
            if let Some(value) = auth {
                request = request.header("Authorization", value);
            }
            let response = request.send().expect("request");
            assert_eq!(response.status(), 401, "{route} with {auth:?}");
            assert!(
                response
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{route}: WWW-Authenticate"
            );
            let body: serde_json::Value = serde_json::from_str(&response.text().expect("body")).expect("JSON error");
            assert!(body["error"].as_str().is_some_and(|e| !e.contains(TOKEN)), "{body}");
        }
        let response = client
            .get(&url)
            .header("Authorization", format!("Bearer {TOKEN}"))
            .send()
            .expect("request");
        assert_eq!(response.status(), 200, "{route} with the token");
    }
    proc.terminate();
    proc.wait_exit(Duration::from_secs(15));
    let logs = format!("{}{}", proc.stdout(), proc.stderr());
    assert!(logs.contains("memtel serving"), "the service logged nothing?\n{logs}");
    assert!(!logs.contains(TOKEN), "the token is in the logs");
}

#[test]
fn debug_routes_on_a_public_address_without_a_token_are_refused() {
    let mut cmd = memtel();
    cmd.args(["--listen", "0.0.0.0:0", "--debug-endpoints"])
        .env("OTEL_SDK_DISABLED", "true")
        .env_remove("MEMTEL_AUTH_TOKEN");
    let (status, _, stderr) = run(cmd, "refusal");
    assert_eq!(status.code(), Some(2), "{stderr}");
    for name in [
        "--auth-token-file",
        "MEMTEL_AUTH_TOKEN_FILE",
        "--debug-endpoints",
        "0.0.0.0",
    ] {
        assert!(stderr.contains(name), "{name} not named in: {stderr}");
    }
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn a_public_address_without_a_token_is_warned_about() {
    let port = free_addr().port();
    let mut cmd = memtel();
    cmd.args(["--listen", &format!("0.0.0.0:{port}"), "--no-demo"])
        .env("OTEL_SDK_DISABLED", "true")
        .env_remove("MEMTEL_AUTH_TOKEN");
    let mut proc = Proc::spawn(cmd, "public without a token");
    proc.wait_ready(&client(), std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    proc.terminate();
    proc.wait_exit(Duration::from_secs(15));
    let stderr = proc.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("without a token")),
        "{stderr}"
    );
}
