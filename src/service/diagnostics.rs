//! Logging, with the OpenTelemetry SDK's own errors rate-limited.
//!
//! With a collector down, the SDK reports a failed export on every interval. Those
//! events are taken out of the normal log and shown at most once per
//! [`PERIOD`] per kind of event, with the count of those not shown in between.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry_sdk::trace::SdkTracer;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// At most one line per kind of SDK error per this period.
pub(crate) const PERIOD: Duration = Duration::from_secs(60);

/// Installs the global subscriber: component scopes and span allocation accounting,
/// spans to OpenTelemetry (when a tracer is given), `RUST_LOG` (default `info`) to
/// stderr, and SDK warnings and errors through the rate limiter.
pub(crate) fn init(tracer: Option<SdkTracer>) {
    // Spans of the exporters' own transport stack are not the service's work.
    let otel = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(filter_fn(|meta| {
                *meta.level() <= Level::INFO
                    && !["opentelemetry", "h2", "hyper", "tonic", "tower", "reqwest"]
                        .iter()
                        .any(|t| meta.target().starts_with(t))
            }))
    });
    let env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(env_filter.and(filter_fn(|meta| !is_sdk(meta.target()))));
    let sdk =
        RateLimited::default().with_filter(filter_fn(|meta| is_sdk(meta.target()) && *meta.level() <= Level::WARN));
    // ComponentLayer first: it records a span's allocation fields before the
    // OpenTelemetry layer ends the span.
    tracing_subscriber::registry()
        .with(memtel::ComponentLayer::new())
        .with(otel)
        .with(fmt)
        .with(sdk)
        .init();
}

fn is_sdk(target: &str) -> bool {
    target.starts_with("opentelemetry")
}

#[derive(Default)]
struct RateLimited {
    windows: Mutex<HashMap<&'static str, Window>>,
}

struct Window {
    shown_at: Instant,
    suppressed: u64,
}

impl<S: Subscriber> Layer<S> for RateLimited {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let now = Instant::now();
        let suppressed = {
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            match windows.get_mut(meta.name()) {
                Some(w) if now.duration_since(w.shown_at) < PERIOD => {
                    w.suppressed += 1;
                    return;
                }
                Some(w) => {
                    let n = w.suppressed;
                    *w = Window {
                        shown_at: now,
                        suppressed: 0,
                    };
                    n
                }
                None => {
                    windows.insert(
                        meta.name(),
                        Window {
                            shown_at: now,
                            suppressed: 0,
                        },
                    );
                    0
                }
            }
        };
        let mut text = Fields::default();
        event.record(&mut text);
        let repeats = if suppressed > 0 {
            format!(" ({suppressed} more like it in the last {}s)", PERIOD.as_secs())
        } else {
            format!(" (further ones summarised every {}s)", PERIOD.as_secs())
        };
        // Emitted under memtel's own target, which this layer does not see again.
        if *meta.level() == Level::ERROR {
            tracing::error!(target: "memtel::otel", "{}{repeats}", text.0);
        } else {
            tracing::warn!(target: "memtel::otel", "{}{repeats}", text.0);
        }
    }
}

#[derive(Default)]
struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{}={value:?}", field.name());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{}={value}", field.name());
    }
}
