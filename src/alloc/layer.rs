//! A `tracing` layer: spans with a `component` field are component scopes, and every
//! span records the heap bytes allocated while it was entered.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Level, Metadata, Subscriber};
use tracing_core::callsite::{Callsite, Identifier};
use tracing_core::field::FieldSet;
use tracing_core::subscriber::Interest;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use super::counters::{self, STATE};
use super::registry;
use super::scope::swap_current;

/// Enters a component's scope while a span carrying a `component = "..."` field is
/// entered, and records on each span's close what it allocated while entered:
/// `memtel.alloc.bytes`, `memtel.alloc.count` and `memtel.dealloc.bytes`.
///
/// Existing `#[instrument(fields(component = "cache"))]` code is then attributed with
/// no other change. The byte counts come from the tracking allocator's per-thread
/// totals, or from jemalloc's per-thread counters when only jemalloc is installed
/// (then without `memtel.alloc.count`); spans record nothing when neither is there.
///
/// The counts reach OpenTelemetry as span attributes through `tracing-opentelemetry`:
/// add this layer *before* the `OpenTelemetryLayer` (closer to the registry), so it
/// records them before that layer ends the span.
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt;
///
/// let subscriber = tracing_subscriber::registry().with(memtel::ComponentLayer::new());
/// tracing::subscriber::with_default(subscriber, || {
///     let span = tracing::info_span!("load", component = "cache");
///     let _entered = span.enter();
///     assert_eq!(memtel::current_component(), memtel::component("cache"));
/// });
/// ```
#[derive(Debug, Clone)]
pub struct ComponentLayer {
    field: &'static str,
}

impl Default for ComponentLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ComponentLayer {
    /// A layer reading the `component` field.
    pub fn new() -> Self {
        Self { field: "component" }
    }

    /// A layer reading another field name for the component. Defaults to `component`.
    pub fn with_field(mut self, field: &'static str) -> Self {
        self.field = field;
        self
    }
}

/// Per-span state, kept in the span's extensions.
struct SpanAlloc {
    /// The component slot + 1, or 0 when the span names none.
    component: AtomicU8,
    bytes: AtomicU64,
    count: AtomicU64,
    freed: AtomicU64,
}

/// One entered span on this thread.
#[derive(Clone, Copy)]
struct Entered {
    id: u64,
    state: *const SpanAlloc,
    previous: Option<u8>,
    start: Totals,
}

#[derive(Clone, Copy, Default)]
struct Totals {
    bytes: u64,
    count: Option<u64>,
    freed: u64,
}

const DEPTH: usize = 32;

thread_local! {
    // Entered spans, innermost last. Fixed capacity: entering never allocates.
    static STACK: RefCell<([Option<Entered>; DEPTH], usize)> = const { RefCell::new(([None; DEPTH], 0)) };
}

/// This thread's cumulative allocation totals, from the cheapest available source.
#[inline]
fn thread_totals() -> Option<Totals> {
    if counters::installed() {
        return STATE
            .try_with(|s| Totals {
                bytes: s.alloc_bytes.get(),
                count: Some(s.alloc_count.get()),
                freed: s.free_bytes.get(),
            })
            .ok();
    }
    jemalloc_thread_totals()
}

#[cfg(feature = "jemalloc")]
fn jemalloc_thread_totals() -> Option<Totals> {
    use std::cell::Cell;
    use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp, ThreadLocal};
    type Pointers = Option<(ThreadLocal<u64>, ThreadLocal<u64>)>;
    thread_local! {
        // jemalloc's per-thread counters, looked up once per thread (None: not available).
        static POINTERS: Cell<Option<Pointers>> = const { Cell::new(None) };
    }
    POINTERS
        .try_with(|p| {
            let pointers = match p.get() {
                Some(known) => known,
                None => {
                    let found = allocatedp::read().ok().zip(deallocatedp::read().ok());
                    p.set(Some(found));
                    found
                }
            };
            pointers.map(|(a, d)| Totals {
                bytes: a.get(),
                count: None,
                freed: d.get(),
            })
        })
        .ok()
        .flatten()
}

#[cfg(not(feature = "jemalloc"))]
fn jemalloc_thread_totals() -> Option<Totals> {
    None
}

struct ComponentField<'a> {
    field: &'a str,
    found: Option<u8>,
}

impl Visit for ComponentField<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.field {
            self.found = Some(registry::intern(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.field {
            self.found = Some(registry::intern(&format!("{value:?}")));
        }
    }
}

impl<S> Layer<S> for ComponentLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut visitor = ComponentField {
            field: self.field,
            found: None,
        };
        attrs.record(&mut visitor);
        span.extensions_mut().insert(SpanAlloc {
            component: AtomicU8::new(visitor.found.map_or(0, |slot| slot + 1)),
            bytes: AtomicU64::new(0),
            count: AtomicU64::new(0),
            freed: AtomicU64::new(0),
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut visitor = ComponentField {
            field: self.field,
            found: None,
        };
        values.record(&mut visitor);
        if let (Some(slot), Some(span)) = (visitor.found, ctx.span(id)) {
            if let Some(state) = span.extensions().get::<SpanAlloc>() {
                state.component.store(slot + 1, Relaxed);
            }
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let extensions = span.extensions();
        let Some(state) = extensions.get::<SpanAlloc>() else {
            return;
        };
        let _ = STACK.try_with(|stack| {
            let mut stack = stack.borrow_mut();
            let (entries, depth) = &mut *stack;
            if *depth == DEPTH {
                return; // too deep: neither scoped nor counted, never unbalanced
            }
            let previous = match state.component.load(Relaxed) {
                0 => None,
                slot => Some(swap_current(slot - 1)),
            };
            entries[*depth] = Some(Entered {
                id: id.into_u64(),
                state: state as *const SpanAlloc,
                previous,
                start: thread_totals().unwrap_or_default(),
            });
            *depth += 1;
        });
    }

    fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
        let end = thread_totals();
        let _ = STACK.try_with(|stack| {
            let mut stack = stack.borrow_mut();
            let (entries, depth) = &mut *stack;
            // Usually the innermost; spans may exit out of order.
            let Some(position) = entries[..*depth]
                .iter()
                .rposition(|e| e.is_some_and(|e| e.id == id.into_u64()))
            else {
                return;
            };
            let Some(entered) = entries[position].take() else {
                return;
            };
            entries.copy_within(position + 1..*depth, position);
            *depth -= 1;
            entries[*depth] = None;
            if let Some(previous) = entered.previous {
                swap_current(previous);
            }
            if let Some(end) = end {
                // SAFETY: the span is entered until this exit, so the registry keeps its
                // extensions, and the boxed SpanAlloc in them, alive.
                let state = unsafe { &*entered.state };
                state
                    .bytes
                    .fetch_add(end.bytes.wrapping_sub(entered.start.bytes), Relaxed);
                state
                    .freed
                    .fetch_add(end.freed.wrapping_sub(entered.start.freed), Relaxed);
                if let (Some(a), Some(b)) = (end.count, entered.start.count) {
                    state.count.fetch_add(a.wrapping_sub(b), Relaxed);
                }
            }
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let totals = {
            let extensions = span.extensions();
            let Some(state) = extensions.get::<SpanAlloc>() else {
                return;
            };
            (
                state.bytes.load(Relaxed),
                state.count.load(Relaxed),
                state.freed.load(Relaxed),
            )
        };
        if thread_totals().is_none() {
            return;
        }
        record_alloc_fields(&id, totals, counters::installed());
    }
}

/// A callsite of our own whose fields name the span attributes we record.
struct AllocFields;
static ALLOC_FIELDS: AllocFields = AllocFields;
const FIELD_NAMES: &[&str] = &["memtel.alloc.bytes", "memtel.alloc.count", "memtel.dealloc.bytes"];
static ALLOC_METADATA: Metadata<'static> = Metadata::new(
    "memtel.alloc",
    "memtel::alloc",
    Level::TRACE,
    None,
    None,
    None,
    FieldSet::new(FIELD_NAMES, Identifier(&ALLOC_FIELDS)),
    tracing_core::metadata::Kind::SPAN,
);

impl Callsite for AllocFields {
    fn set_interest(&self, _: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        &ALLOC_METADATA
    }
}

/// Records the totals on the span through the dispatcher, as `span.record` would, so
/// every layer (tracing-opentelemetry among them) sees them as the span's fields.
fn record_alloc_fields(id: &Id, (bytes, count, freed): (u64, u64, u64), with_count: bool) {
    let fields = ALLOC_METADATA.fields();
    let (Some(bytes_field), Some(count_field), Some(freed_field)) = (
        fields.field(FIELD_NAMES[0]),
        fields.field(FIELD_NAMES[1]),
        fields.field(FIELD_NAMES[2]),
    ) else {
        return;
    };
    // i64: OpenTelemetry attributes have no unsigned integers, and tracing-opentelemetry
    // turns a u64 into a string.
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let (bytes, count, freed) = (as_i64(bytes), as_i64(count), as_i64(freed));
    let count_value: Option<&dyn tracing::Value> = if with_count { Some(&count) } else { None };
    let values = [
        (&bytes_field, Some(&bytes as &dyn tracing::Value)),
        (&count_field, count_value),
        (&freed_field, Some(&freed as &dyn tracing::Value)),
    ];
    let value_set = fields.value_set(&values);
    tracing::dispatcher::get_default(|dispatch| dispatch.record(id, &Record::new(&value_set)));
}
