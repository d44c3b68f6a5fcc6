//! The live page in Debian's headless Chromium, driven over WebDriver (chromedriver, plain
//! HTTP): it loads without console errors or external requests, its `data-metric` figures
//! match the JSON (5 %), its charts have data, and with a token it works once the token is
//! entered. `scripts/install-chromium.sh` installs both (CI runs it).
#![cfg(all(feature = "service", target_os = "linux"))]

#[path = "support/service.rs"]
mod service;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use service::*;

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn install() {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-chromium.sh"))
        .output()
        .expect("run install-chromium.sh");
    assert!(
        out.status.success(),
        "install-chromium.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Driver {
    fn start(profile_dir: &std::path::Path) -> Driver {
        install();
        let port = free_addr().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let start = Instant::now();
        while http.get(format!("{base}/status")).send().is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile_dir.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
            "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"}
        }}});
        let response: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .expect("new session")
            .json()
            .expect("JSON");
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {response}"))
            .to_owned();
        Driver {
            child,
            base,
            session,
            http,
        }
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method.clone(), url);
        if method != reqwest::Method::GET {
            request = request.json(&body);
        }
        let response: Value = request.send().expect("webdriver").json().expect("JSON");
        response["value"].clone()
    }

    fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }));
    }

    /// The WebDriver id of the element `css` selects.
    fn element(&self, css: &str) -> String {
        let found = self.call(
            reqwest::Method::POST,
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned()
    }

    fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    fn wait_loaded(&self, at_least: u64) {
        let start = Instant::now();
        loop {
            let loaded = self
                .script("return Number(document.body.dataset.loaded || 0);")
                .as_u64()
                .unwrap_or(0);
            if loaded >= at_least {
                return;
            }
            let error = self.script("return document.getElementById('error').textContent;");
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the page never drew its figures (error: {error})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self, kind: &str) -> Vec<Value> {
        self.call(reqwest::Method::POST, "/se/log", json!({ "type": kind }))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

fn start_service(args: &[&str]) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let mut cmd = memtel();
    cmd.args(["--listen", &addr.to_string(), "--history-interval", "500ms"])
        .args(args)
        .env("OTEL_SDK_DISABLED", "true");
    let mut proc = Proc::spawn(cmd, "memtel for the page");
    proc.wait_ready(&client(), addr);
    (proc, addr)
}

#[test]
fn the_page_shows_the_json_draws_charts_and_asks_for_a_token() {
    // A screenshot for README, when asked for (scripts/page-screenshot.sh).
    if let Ok(path) = std::env::var("MEMTEL_PAGE_SCREENSHOT") {
        screenshot(&path);
    }
    // Without the demo the figures hold still, so the page and a JSON read a moment apart
    // can be compared.
    let (proc, addr) = start_service(&["--no-demo"]);
    std::thread::sleep(Duration::from_secs(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = Driver::start(dir.path());
    driver.go(&format!("http://{addr}/memory"));
    driver.wait_loaded(2);

    // Figures match the JSON read now (5 %, or 1 MB of rounding).
    // The page polls once more on request and its figures are read at once, then the JSON.
    let figures = driver.call(
        reqwest::Method::POST,
        "/execute/async",
        json!({"script": "const done = arguments[arguments.length - 1]; poll().then(() => { const out = {}; for (const el of document.querySelectorAll('[data-metric]')) out[el.dataset.metric] = el.textContent; done(out); });", "args": []}),
    );
    let profile = get_json(&client(), addr, "/api/v1/memory/profile");
    let mut compared = 0;
    for (path, shown) in figures.as_object().expect("figures") {
        let truth = path.split('.').try_fold(&profile, |v, k| v.get(k));
        let (Some(truth), Ok(shown)) = (
            truth.and_then(Value::as_f64),
            shown.as_str().unwrap_or("").parse::<f64>(),
        ) else {
            continue;
        };
        assert!(
            (shown - truth).abs() <= (0.05 * truth.abs()).max(1.0),
            "{path}: the page shows {shown}, the JSON {truth}"
        );
        compared += 1;
    }
    assert!(compared >= 8, "only {compared} figures compared: {figures}");
    assert_eq!(figures["pressure"], profile["pressure"]);

    // Every chart has drawn data.
    for chart in ["rss", "pressure", "components", "jemalloc"] {
        let shapes = driver.script(&format!(
            "return document.querySelectorAll('svg[data-chart={chart}] polyline, svg[data-chart={chart}] polygon').length;"
        ));
        assert!(shapes.as_u64().unwrap_or(0) > 0, "chart {chart} is empty");
    }

    // No console errors; no request left the service.
    let console: Vec<Value> = driver.logs("browser");
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] == "SEVERE").collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let here = format!("http://{addr}/");
    for entry in driver.logs("performance") {
        let message: Value = serde_json::from_str(entry["message"].as_str().unwrap_or("{}")).unwrap_or_default();
        if message["message"]["method"] == "Network.requestWillBeSent" {
            let url = message["message"]["params"]["request"]["url"].as_str().unwrap_or("");
            // Chromium's own pages (chrome://, the new tab before navigating) are not the network.
            if url.starts_with("http://") || url.starts_with("https://") || url.starts_with("ws") {
                assert!(url.starts_with(&here), "an external request: {url}");
            }
        }
    }

    // The RSS chart's warning and critical bands sit at the JSON's thresholds of the limit
    // (the chart's scale is the limit while RSS is below it).
    let bands = driver.script(
        "const svg = document.querySelector('svg[data-chart=rss]'); \
         const h = svg.viewBox.baseVal.height; \
         return Object.fromEntries([...svg.querySelectorAll('line[data-band]')].map((l) => \
           [l.dataset.band, (h - Number(l.getAttribute('y1'))) / (h - 4)]));",
    );
    let thresholds = &profile["stats"]["thresholds"];
    for band in ["warning", "critical"] {
        let (drawn, truth) = (bands[band].as_f64(), thresholds[band].as_f64());
        assert!(
            matches!((drawn, truth), (Some(d), Some(t)) if (d - t).abs() < 0.01),
            "the {band} band is drawn at {drawn:?} of the limit, the JSON says {truth:?}: {bands}"
        );
    }
    drop(driver);
    proc.terminate();

    // With a token: the page asks for it, then shows the figures.
    let token_dir = tempfile::tempdir().expect("tempdir");
    let token_file = write_file(token_dir.path(), "token", "page-token-81f2\n");
    let (proc, addr) = start_service(&["--no-demo", "--auth-token-file", token_file.to_str().expect("path")]);
    let driver = Driver::start(token_dir.path().join("profile").as_path());
    driver.go(&format!("http://{addr}/memory"));
    let start = Instant::now();
    while driver.script("return document.getElementById('login').classList.contains('shown');") != json!(true) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the page never asked for the token"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let input = driver.element("#token");
    driver.call(
        reqwest::Method::POST,
        &format!("/element/{input}/value"),
        json!({"text": "page-token-81f2"}),
    );
    let button = driver.element("#login-button");
    driver.call(reqwest::Method::POST, &format!("/element/{button}/click"), json!({}));
    driver.wait_loaded(1);
    let rss = driver.script("return document.querySelector('[data-metric=current_usage_mb]').textContent;");
    assert!(
        rss.as_str().is_some_and(|s| s.parse::<f64>().is_ok_and(|v| v > 0.0)),
        "RSS after the token: {rss}"
    );
    let stored = driver.script("return [sessionStorage.getItem('memtel-token'), localStorage.length];");
    assert_eq!(stored, json!(["page-token-81f2", 0]), "kept in the session only");
    drop(driver);
    proc.terminate();
}

/// The page of the service running its demo workload with a slow leak, half a minute into
/// its history (so the charts and the trends have something to show), saved as a PNG.
fn screenshot(path: &str) {
    let (proc, addr) = start_service(&["--demo-leak-mb-per-min", "20"]);
    std::thread::sleep(Duration::from_secs(30));
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = Driver::start(dir.path());
    driver.go(&format!("http://{addr}/memory"));
    driver.wait_loaded(2);
    let png = driver.call(reqwest::Method::GET, "/screenshot", Value::Null);
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().expect("base64 PNG"))
        .expect("base64");
    std::fs::write(path, bytes).expect("write the screenshot");
    drop(driver);
    proc.terminate();
}

#[test]
fn a_browser_that_accepts_gzip_gets_the_same_page_gzipped() {
    let (_proc, addr) = start_service(&["--no-demo"]);
    let url = format!("http://{addr}/memory");
    let plain = client().get(&url).send().expect("GET /memory");
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.headers().get("content-encoding"), None);
    let plain = plain.bytes().unwrap();
    assert!(plain.starts_with(b"<!doctype html>"));
    for _ in 0..2 {
        let gzipped = client()
            .get(&url)
            .header("accept-encoding", "gzip, deflate, br")
            .send()
            .expect("GET /memory, gzip");
        assert_eq!(gzipped.headers()["content-encoding"], "gzip");
        assert_eq!(gzipped.headers()["content-type"], "text/html; charset=utf-8");
        let compressed = gzipped.bytes().unwrap();
        assert!(
            compressed.len() < plain.len() / 2,
            "{} of {} bytes",
            compressed.len(),
            plain.len()
        );
        let mut page = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&compressed[..]), &mut page).expect("gzip");
        assert_eq!(page, plain);
    }
}
