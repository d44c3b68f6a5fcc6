//! The `memtel` service: settings → monitor → OpenTelemetry pipeline → HTTP server.

mod service;

use std::process::ExitCode;
use std::time::Duration;

use axum::routing::get;
use memtel::{MemoryManager, MemoryMonitor};

use service::pipeline::{OtelSettings, Pipeline};
use service::settings::Settings;
use service::{demo, diagnostics, limits};

/// Every heap byte attributed to the component that allocated it, served by jemalloc;
/// allocations sampled for heap profiles (`--heap-profile-sample`).
#[global_allocator]
static GLOBAL: memtel::alloc::TrackingAllocator<tikv_jemallocator::Jemalloc> =
    memtel::alloc::TrackingAllocator::new(tikv_jemallocator::Jemalloc).with_heap_profiling();

/// How long shutdown waits for the last metrics flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let (settings, otel) = match Settings::load().and_then(|s| Ok((s, OtelSettings::from_env()?))) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("memtel: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    // Bind first: an address in use is reported before anything else starts.
    let listener = match runtime.block_on(tokio::net::TcpListener::bind(settings.listen)) {
        Ok(l) => l,
        Err(e) => {
            return fail(format!(
                "cannot listen on {} (--listen / MEMTEL_LISTEN / server.listen): {e}",
                settings.listen
            ))
        }
    };
    let _context = runtime.enter();
    let pipeline = match Pipeline::start(&otel) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("memtel: {e}");
            return ExitCode::from(2);
        }
    };
    diagnostics::init(pipeline.tracer());

    let history = match memtel::History::new(settings.history) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("memtel: {e} (--history-interval / --history-retention)");
            return ExitCode::from(2);
        }
    };
    let mut builder = MemoryMonitor::builder()
        .thresholds(settings.thresholds)
        .hysteresis(settings.hysteresis)
        .history(history.clone());
    if let Some(bytes) = settings.limit_bytes {
        builder = builder.limit_bytes(bytes);
    }
    if let Some(percent) = settings.psi_full_escalation {
        builder = builder.psi_full_escalation(percent);
    }
    let monitor = builder.build();
    if let Some(meter) = pipeline.meter() {
        memtel::register(&monitor, &meter);
    }
    let mut manager = MemoryManager::new(monitor.clone())
        .check_interval(settings.check_interval)
        .cooldown(settings.cooldown);
    if let Some(bytes) = settings.gc_trigger_bytes {
        manager = manager.gc_trigger_bytes(bytes);
    }
    if settings.demo {
        manager = demo::start(manager, settings.demo_leak_mb_per_min);
    }
    manager.spawn();
    history.spawn_recorder(monitor.clone());
    let limit = monitor.limit();
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        limit_bytes = limit.map(|l| l.bytes),
        limit_source = limit.map(|l| l.source.as_str()),
        jemalloc = monitor.jemalloc_available(),
        demo = settings.demo,
        demo_leak_mb_per_min = settings.demo_leak_mb_per_min,
        history_interval_ms = settings.history.interval.as_millis() as u64,
        heap_profile_sample = settings.heap_profile_sample,
        debug_endpoints = settings.debug_endpoints,
        auth = settings.auth.is_some(),
        rate_limit = settings.rate_limit,
        "memtel serving {}",
        memtel::PROFILE_PATH
    );

    memtel::alloc::set_heap_sample_interval(settings.heap_profile_sample);
    let cheap = memtel::profile_router(monitor.clone()).merge(memtel::metrics_router(monitor.clone()));
    let mut expensive = memtel::history_router(monitor);
    if settings.debug_endpoints {
        expensive = expensive.merge(memtel::profile::debug_router());
    }
    let mut data = limits::apply(cheap, expensive, settings.rate_limit);
    if let Some(auth) = &settings.auth {
        data = auth.layer(data);
    } else if !settings.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %settings.listen,
            "serving memory figures on a non-loopback address without a token \
             (--auth-token-file / MEMTEL_AUTH_TOKEN_FILE / server.auth_token_file, or MEMTEL_AUTH_TOKEN)"
        );
    }
    // The page's HTML holds no figures: open, like /healthz; it reads the data routes.
    let open = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(memtel::page::page_router());
    let app = limits::apply_open(open).merge(data);
    let served = runtime.block_on(async {
        // The peer address keys the per-client rate limit.
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown_signal())
        .await
    });
    // Flush while the runtime still runs: the gRPC exporter's channel lives on it.
    pipeline.shutdown(FLUSH_TIMEOUT);
    drop(_context);
    drop(runtime);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("server failed: {e}")),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("memtel: {message}");
    ExitCode::from(1)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return interrupt.await.unwrap_or(()),
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
}
