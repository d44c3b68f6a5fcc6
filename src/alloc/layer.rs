//! A `tracing` layer: spans with a `component` field are component scopes, and every
//! span records the heap bytes allocated while it was entered.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::Mutex;

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

/// Per-span counters. Records are owned by memtel and never freed: a closed span's
/// record goes back to a pool, and its serial number changes on every reuse, so a
/// cached pointer is always safe to read and a stale one is recognised.
struct SpanRecord {
    serial: AtomicU64,
    /// The component slot + 1, or 0 when the span names none.
    component: AtomicU8,
    bytes: AtomicU64,
    count: AtomicU64,
    freed: AtomicU64,
    /// The span's name (from its metadata, `'static`): pointer and length.
    name: (std::sync::atomic::AtomicPtr<u8>, std::sync::atomic::AtomicUsize),
}

static POOL: Mutex<Vec<&'static SpanRecord>> = Mutex::new(Vec::new());
static SERIALS: AtomicU64 = AtomicU64::new(1);

/// A record for a new span, from the pool or newly leaked (the pool only grows to the
/// number of spans open at once).
fn take_record(component: Option<u8>, name: &'static str) -> (&'static SpanRecord, u64) {
    let serial = SERIALS.fetch_add(1, Relaxed);
    let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let record = pooled.unwrap_or_else(|| {
        Box::leak(Box::new(SpanRecord {
            serial: AtomicU64::new(0),
            component: AtomicU8::new(0),
            bytes: AtomicU64::new(0),
            count: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            name: Default::default(),
        }))
    });
    record.name.0.store(name.as_ptr().cast_mut(), Relaxed);
    record.name.1.store(name.len(), Relaxed);
    record.component.store(component.map_or(0, |slot| slot + 1), Relaxed);
    record.bytes.store(0, Relaxed);
    record.count.store(0, Relaxed);
    record.freed.store(0, Relaxed);
    record.serial.store(serial, Release);
    (record, serial)
}

/// What the span's extensions hold: its record and the serial it was issued with.
struct SpanHandle {
    record: &'static SpanRecord,
    serial: u64,
}

/// One entered span on this thread.
#[derive(Clone, Copy)]
struct Entered {
    id: u64,
    record: *const SpanRecord,
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
const CACHE: usize = 64;

/// A direct-mapped cache entry: span id, record, serial.
type Cached = Cell<(u64, *const SpanRecord, u64)>;

thread_local! {
    // Entered spans, innermost last. Fixed capacity: entering never allocates.
    static STACK: RefCell<([Option<Entered>; DEPTH], usize)> = const { RefCell::new(([None; DEPTH], 0)) };
    // Span id → record, so entering a span rarely needs the registry's lookup.
    static RECORDS: [Cached; CACHE] = const { [const { Cell::new((0, std::ptr::null(), 0)) }; CACHE] };
}

fn cache_put(id: u64, record: &'static SpanRecord, serial: u64) {
    let _ = RECORDS.try_with(|c| c[(id as usize) % CACHE].set((id, record, serial)));
}

/// The record of span `id` from this thread's cache, if it is still that span's.
#[inline]
fn cache_get(id: u64) -> Option<&'static SpanRecord> {
    let (key, record, serial) = RECORDS.try_with(|c| c[(id as usize) % CACHE].get()).ok()?;
    if key != id || record.is_null() {
        return None;
    }
    // SAFETY: records are leaked, never freed.
    let record: &'static SpanRecord = unsafe { &*record };
    (record.serial.load(Acquire) == serial).then_some(record)
}

/// This thread's cumulative allocation totals, from the cheapest available source.
#[inline]
fn thread_totals() -> Option<Totals> {
    if counters::installed() {
        return STATE
            .try_with(|s| Totals {
                bytes: counters::allocated_total(s),
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
        let (record, serial) = take_record(visitor.found, attrs.metadata().name());
        span.extensions_mut().insert(SpanHandle { record, serial });
        // Spans are usually entered on the thread that made them.
        cache_put(id.into_u64(), record, serial);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut visitor = ComponentField {
            field: self.field,
            found: None,
        };
        values.record(&mut visitor);
        if let (Some(slot), Some(span)) = (visitor.found, ctx.span(id)) {
            if let Some(handle) = span.extensions().get::<SpanHandle>() {
                handle.record.component.store(slot + 1, Relaxed);
            }
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let record = match cache_get(id.into_u64()) {
            Some(record) => record,
            None => {
                let Some(span) = ctx.span(id) else { return };
                let extensions = span.extensions();
                let Some(handle) = extensions.get::<SpanHandle>() else {
                    return;
                };
                cache_put(id.into_u64(), handle.record, handle.serial);
                handle.record
            }
        };
        let _ = STACK.try_with(|stack| {
            let mut stack = stack.borrow_mut();
            let (entries, depth) = &mut *stack;
            if *depth == DEPTH {
                return; // too deep: neither scoped nor counted, never unbalanced
            }
            let previous = match record.component.load(Relaxed) {
                0 => None,
                slot => Some(swap_current(slot - 1)),
            };
            entries[*depth] = Some(Entered {
                id: id.into_u64(),
                record,
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
                // SAFETY: records are leaked, never freed; the span is open while entered.
                let record = unsafe { &*entered.record };
                let add = |counter: &AtomicU64, delta: u64| {
                    if delta != 0 {
                        counter.fetch_add(delta, Relaxed);
                    }
                };
                add(&record.bytes, end.bytes.wrapping_sub(entered.start.bytes));
                add(&record.freed, end.freed.wrapping_sub(entered.start.freed));
                if let (Some(a), Some(b)) = (end.count, entered.start.count) {
                    add(&record.count, a.wrapping_sub(b));
                }
            }
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(handle) = span.extensions_mut().remove::<SpanHandle>() else {
            return;
        };
        let record = handle.record;
        let totals = (
            record.bytes.load(Relaxed),
            record.count.load(Relaxed),
            record.freed.load(Relaxed),
        );
        if thread_totals().is_some() {
            record_alloc_fields(&id, totals, counters::installed());
        }
        // Retire the serial before pooling, so every cached copy goes stale.
        record.serial.store(0, Release);
        POOL.lock().unwrap_or_else(|p| p.into_inner()).push(record);
    }
}

/// The name of the innermost span this thread has entered through the layer, if any: the
/// heap profiler's `span` label. Never blocks: `None` while the layer is updating it.
#[cfg(feature = "profiling")]
pub(crate) fn innermost_span() -> Option<&'static str> {
    STACK
        .try_with(|stack| {
            let stack = stack.try_borrow().ok()?;
            let (entries, depth) = &*stack;
            let entered = entries[..*depth].last()?.as_ref()?;
            // SAFETY: records are leaked, never freed.
            let record = unsafe { &*entered.record };
            let (ptr, len) = (record.name.0.load(Relaxed), record.name.1.load(Relaxed));
            if ptr.is_null() {
                return None;
            }
            // SAFETY: pointer and length of a `&'static str` (a span's metadata name),
            // stored together when the record was issued to this span.
            Some(unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(ptr, len)) })
        })
        .ok()
        .flatten()
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn reused_span_ids_and_cross_thread_enters_get_the_right_component() {
        let subscriber = tracing_subscriber::registry().with(ComponentLayer::new());
        let dispatch = tracing::Dispatch::new(subscriber);
        tracing::dispatcher::with_default(&dispatch, || {
            // The registry reuses the ids of closed spans: every span must still scope
            // its own component, whatever this thread's cache held for that id.
            for i in 0..500 {
                let name = ["layer_a", "layer_b", "layer_c"][i % 3];
                let span = tracing::info_span!("step", component = name);
                let _entered = span.enter();
                assert_eq!(crate::current_component(), crate::component(name), "iteration {i}");
            }
            // A span made here and entered on another thread (a cache miss there).
            let span = tracing::info_span!("moved", component = "layer_moved");
            let dispatch = dispatch.clone();
            std::thread::spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let _entered = span.enter();
                    assert_eq!(crate::current_component(), crate::component("layer_moved"));
                });
                assert_eq!(crate::current_component(), crate::Component::OTHER);
            })
            .join()
            .unwrap();
            // Nested spans restore the outer component on exit.
            let outer = tracing::info_span!("outer", component = "layer_outer");
            let _o = outer.enter();
            {
                let inner = tracing::info_span!("inner");
                let _i = inner.enter();
                assert_eq!(
                    crate::current_component(),
                    crate::component("layer_outer"),
                    "no field: unchanged"
                );
                let named = tracing::info_span!("named", component = "layer_inner");
                let _n = named.enter();
                assert_eq!(crate::current_component(), crate::component("layer_inner"));
            }
            assert_eq!(crate::current_component(), crate::component("layer_outer"));
        });
    }
}
