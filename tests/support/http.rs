//! Serves a router on a real loopback socket and fetches from it.
#![allow(dead_code)]

use std::net::SocketAddr;

/// A server on 127.0.0.1:<ephemeral> running on its own runtime thread; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl TestServer {
    pub fn start(app: axum::Router) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            _runtime: runtime,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET the path and parse the body as JSON; panics unless 200 + application/json.
    pub fn get_json(&self, client: &reqwest::blocking::Client, path: &str) -> serde_json::Value {
        let response = client.get(self.url(path)).send().expect("request");
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(content_type, "application/json");
        serde_json::from_str(&response.text().expect("body")).expect("JSON body")
    }
}
