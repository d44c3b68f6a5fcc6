//! What `memtel::ComponentLayer` adds to entering and exiting a span.
//!
//! Every subscriber runs under memtel's `TrackingAllocator<Jemalloc>`: the comparison is
//! `tracing_subscriber::registry()` alone against `registry().with(ComponentLayer::new())`.
//! Each benchmark enters a pre-created span and drops the guard (one enter/exit pair),
//! for a span without fields (`plain`) and one with a `component` field (`component`).
//! The layer's cost per pair is `layer/x − registry/x`.
//!
//! For where that time goes, the same pair under stand-in layers: `noop_layer` (a
//! layer that does nothing: the cost of being a layer at all), `lookup_layer` (looks
//! its span data up in `on_enter`, as any layer keeping per-span state must:
//! `ctx.span(id)` + `extensions()`), `atomics_layer` (three atomic adds on exit, as
//! `ComponentLayer` makes to a span's counters); and `memtel_guard`, memtel's own
//! component scope (`Component::enter` + drop) for scale.
//!
//! Part of the allocator comparison; run all of it with `scripts/alloc-bench.sh`.

#[path = "support/alloc_workloads.rs"]
mod workloads;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use memtel::alloc::TrackingAllocator;
use tracing::span::{Attributes, Id};
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[global_allocator]
static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> = TrackingAllocator::new(tikv_jemallocator::Jemalloc);

/// A layer that does nothing.
struct NoopLayer;

impl<S: Subscriber> Layer<S> for NoopLayer {}

/// A layer that keeps a value in each span's extensions and looks it up on enter.
struct LookupLayer;

struct Marker(u8);

impl<S> Layer<S> for LookupLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, _attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Marker(1));
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            black_box(span.extensions().get::<Marker>().map(|m| m.0));
        }
    }
}

/// A layer that does on exit what `ComponentLayer` does to a span's totals: three atomic
/// adds (of zero here) to per-span counters, with no lookup.
struct AtomicsLayer([AtomicU64; 3]);

impl<S: Subscriber> Layer<S> for AtomicsLayer {
    fn on_exit(&self, _id: &Id, _ctx: Context<'_, S>) {
        for counter in &self.0 {
            counter.fetch_add(black_box(0), Relaxed);
        }
    }
}

fn main() {
    let mut c = workloads::criterion();
    let mut group = c.benchmark_group("span/enter_exit");
    workloads::short(&mut group);

    let subscribers = [
        ("registry", Dispatch::new(tracing_subscriber::registry())),
        (
            "layer",
            Dispatch::new(tracing_subscriber::registry().with(memtel::ComponentLayer::new())),
        ),
        (
            "noop_layer",
            Dispatch::new(tracing_subscriber::registry().with(NoopLayer)),
        ),
        (
            "lookup_layer",
            Dispatch::new(tracing_subscriber::registry().with(LookupLayer)),
        ),
        (
            "atomics_layer",
            Dispatch::new(tracing_subscriber::registry().with(AtomicsLayer(Default::default()))),
        ),
    ];
    for (name, dispatch) in &subscribers {
        tracing::dispatcher::with_default(dispatch, || {
            let plain = tracing::info_span!("plain");
            let scoped = tracing::info_span!("scoped", component = "span_bench");
            assert!(!plain.is_disabled() && !scoped.is_disabled(), "spans must be enabled");
            if *name == "layer" {
                let _entered = scoped.enter();
                assert_eq!(memtel::current_component(), memtel::component("span_bench"));
            }
            group.bench_function(format!("{name}/plain"), |b| b.iter(|| drop(black_box(plain.enter()))));
            if matches!(*name, "registry" | "layer") {
                group.bench_function(format!("{name}/component"), |b| {
                    b.iter(|| drop(black_box(scoped.enter())))
                });
            }
        });
    }
    let component = memtel::component("span_bench");
    group.bench_function("memtel_guard", |b| b.iter(|| drop(black_box(component.enter()))));
    group.finish();
    c.final_summary();
}
