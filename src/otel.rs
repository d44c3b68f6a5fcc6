//! The OpenTelemetry view: the metrics contract as one table, registered as
//! observable instruments that read the monitor's latest snapshot.

use std::panic::{catch_unwind, AssertUnwindSafe};

use opentelemetry::metrics::{AsyncInstrument, Meter};
use opentelemetry::{InstrumentationScope, KeyValue, Value};

use crate::monitor::OTHER_COMPONENT;
use crate::snapshot::{Pressure, Snapshot};
use crate::MemoryMonitor;

/// The instrumentation scope memtel's instruments belong to: `memtel`, at this
/// crate's version.
///
/// ```
/// use opentelemetry::metrics::MeterProvider;
/// # let provider = opentelemetry::global::meter_provider();
/// let meter = provider.meter_with_scope(memtel::scope());
/// # let _ = meter;
/// ```
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("memtel")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// Registers every instrument of the metrics contract on `meter`.
///
/// Each instrument is observable: its callback reads [`MemoryMonitor::snapshot`],
/// which reuses one snapshot for all the callbacks of one collection. A callback that
/// panics observes nothing for that collection instead of unwinding into the SDK.
/// Use a meter with [`scope()`] so the data carries the `memtel` scope.
///
/// ```
/// # #[global_allocator]
/// # static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
/// use opentelemetry::metrics::MeterProvider;
/// let provider = opentelemetry::global::meter_provider();
/// let monitor = memtel::MemoryMonitor::new();
/// memtel::register(&monitor, &provider.meter_with_scope(memtel::scope()));
/// ```
pub fn register(monitor: &MemoryMonitor, meter: &Meter) {
    for def in METRICS {
        let observe = def.observe;
        let monitor = monitor.clone();
        // Each callback reads the shared snapshot and forwards its values.
        macro_rules! callback {
            ($convert:expr) => {
                move |inst: &dyn AsyncInstrument<_>| {
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        let snap = monitor.snapshot();
                        observe(&snap, &mut |n: Num, attrs: &[KeyValue]| {
                            inst.observe($convert(n), attrs)
                        });
                    }));
                }
            };
        }
        match def.instrument {
            Instrument::UpDownCounterI64 => {
                meter
                    .i64_observable_up_down_counter(def.name)
                    .with_unit(def.unit)
                    .with_description(def.description)
                    .with_callback(callback!(Num::as_i64))
                    .build();
            }
            Instrument::GaugeI64 => {
                meter
                    .i64_observable_gauge(def.name)
                    .with_unit(def.unit)
                    .with_description(def.description)
                    .with_callback(callback!(Num::as_i64))
                    .build();
            }
            Instrument::GaugeF64 => {
                meter
                    .f64_observable_gauge(def.name)
                    .with_unit(def.unit)
                    .with_description(def.description)
                    .with_callback(callback!(Num::as_f64))
                    .build();
            }
            Instrument::CounterF64 => {
                meter
                    .f64_observable_counter(def.name)
                    .with_unit(def.unit)
                    .with_description(def.description)
                    .with_callback(callback!(Num::as_f64))
                    .build();
            }
            Instrument::CounterU64 => {
                meter
                    .u64_observable_counter(def.name)
                    .with_unit(def.unit)
                    .with_description(def.description)
                    .with_callback(callback!(Num::as_u64))
                    .build();
            }
        }
    }
}

/// The kind of instrument a contract row is registered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Instrument {
    /// `ObservableUpDownCounter<i64>`: exported as a non-monotonic sum.
    UpDownCounterI64,
    /// `ObservableGauge<i64>`.
    GaugeI64,
    /// `ObservableGauge<f64>`.
    GaugeF64,
    /// `ObservableCounter<u64>`: exported as a monotonic sum.
    CounterU64,
    /// `ObservableCounter<f64>`: exported as a monotonic sum.
    CounterF64,
}

/// One row of the metrics contract.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MetricDef {
    /// The instrument name.
    pub name: &'static str,
    /// The instrument kind.
    pub instrument: Instrument,
    /// The UCUM unit.
    pub unit: &'static str,
    /// One sentence.
    pub description: &'static str,
    /// The attribute keys its data points carry.
    pub attributes: &'static [&'static str],
    observe: Observe,
}

type Observe = fn(&Snapshot, &mut dyn FnMut(Num, &[KeyValue]));

impl MetricDef {
    /// Calls `emit` with each data point this instrument observes in `snap`: the value
    /// (as `f64`) and its attributes. The `/metrics` view reads the contract through it.
    pub fn observe_into(&self, snap: &Snapshot, emit: &mut dyn FnMut(f64, &[KeyValue])) {
        (self.observe)(snap, &mut |n, attrs| emit(n.as_f64(), attrs));
    }
}

#[derive(Debug, Clone, Copy)]
enum Num {
    U(u64),
    F(f64),
}

impl Num {
    fn as_i64(self) -> i64 {
        match self {
            Num::U(u) => i64::try_from(u).unwrap_or(i64::MAX),
            Num::F(f) => f as i64,
        }
    }
    fn as_u64(self) -> u64 {
        match self {
            Num::U(u) => u,
            Num::F(f) => f as u64,
        }
    }
    fn as_f64(self) -> f64 {
        match self {
            Num::U(u) => u as f64,
            Num::F(f) => f,
        }
    }
}

fn bytes(value: Option<u64>, emit: &mut dyn FnMut(Num, &[KeyValue])) {
    if let Some(v) = value {
        emit(Num::U(v), &[]);
    }
}

fn ratio(value: Option<f64>, emit: &mut dyn FnMut(Num, &[KeyValue])) {
    if let Some(v) = value {
        emit(Num::F(v), &[]);
    }
}

/// The metrics contract (ARCHITECTURE.md), one row per instrument. Registration,
/// tests and docs all read this table.
pub const METRICS: &[MetricDef] = &[
    MetricDef {
        name: "process.memory.usage",
        instrument: Instrument::UpDownCounterI64,
        unit: "By",
        description: "The amount of physical memory in use (resident set size).",
        attributes: &[],
        observe: |s, emit| bytes(s.rss_bytes, emit),
    },
    MetricDef {
        name: "process.memory.virtual",
        instrument: Instrument::UpDownCounterI64,
        unit: "By",
        description: "The amount of committed virtual memory.",
        attributes: &[],
        observe: |s, emit| bytes(s.virtual_bytes, emit),
    },
    MetricDef {
        name: "memtel.memory.peak",
        instrument: Instrument::GaugeI64,
        unit: "By",
        description: "The highest resident set size of this process since it started.",
        attributes: &[],
        observe: |s, emit| bytes(s.peak_rss_bytes, emit),
    },
    MetricDef {
        name: "memtel.memory.limit",
        instrument: Instrument::UpDownCounterI64,
        unit: "By",
        description: "The memory limit that pressure is measured against.",
        attributes: &["memtel.limit.source"],
        observe: |s, emit| {
            if let Some(limit) = s.limit {
                emit(
                    Num::U(limit.bytes),
                    &[KeyValue::new("memtel.limit.source", limit.source.as_str())],
                );
            }
        },
    },
    MetricDef {
        name: "process.memory.utilization",
        instrument: Instrument::GaugeF64,
        unit: "1",
        description: "The resident set size as a fraction of the memory limit.",
        attributes: &[],
        observe: |s, emit| ratio(s.utilization(), emit),
    },
    MetricDef {
        name: "memtel.memory.pressure",
        instrument: Instrument::UpDownCounterI64,
        unit: "1",
        description: "The memory pressure level as a state set: 1 for the current level, 0 for the others.",
        attributes: &["memtel.pressure.level"],
        observe: |s, emit| {
            for level in Pressure::ALL {
                let value = u64::from(level == s.pressure);
                emit(Num::U(value), &[KeyValue::new("memtel.pressure.level", level.as_str())]);
            }
        },
    },
    MetricDef {
        name: "memtel.heap.allocated",
        instrument: Instrument::UpDownCounterI64,
        unit: "By",
        description: "The bytes of live heap allocations: as requested with the tracking allocator, else jemalloc's allocated bytes.",
        attributes: &[],
        observe: |s, emit| bytes(s.heap_allocated_bytes, emit),
    },
    MetricDef {
        name: "jemalloc.memory",
        instrument: Instrument::UpDownCounterI64,
        unit: "By",
        description: "jemalloc's memory statistics, by statistic.",
        attributes: &["jemalloc.stat"],
        observe: |s, emit| {
            if let Some(j) = s.jemalloc {
                for (stat, value) in [
                    ("allocated", j.allocated),
                    ("active", j.active),
                    ("resident", j.resident),
                    ("metadata", j.metadata),
                    ("mapped", j.mapped),
                    ("retained", j.retained),
                ] {
                    emit(Num::U(value), &[KeyValue::new("jemalloc.stat", stat)]);
                }
            }
        },
    },
    MetricDef {
        name: "jemalloc.fragmentation",
        instrument: Instrument::GaugeF64,
        unit: "1",
        description: "jemalloc's resident bytes divided by its allocated bytes.",
        attributes: &[],
        observe: |s, emit| ratio(s.jemalloc.and_then(|j| j.fragmentation_ratio()), emit),
    },
    MetricDef {
        name: "jemalloc.metadata.overhead",
        instrument: Instrument::GaugeF64,
        unit: "1",
        description: "jemalloc's metadata bytes divided by its allocated bytes.",
        attributes: &[],
        observe: |s, emit| ratio(s.jemalloc.and_then(|j| j.metadata_overhead_ratio()), emit),
    },
    MetricDef {
        name: "memtel.component.usage",
        instrument: Instrument::UpDownCounterI64,
        unit: "By",
        description: "The live bytes of each component, the heap remainder as other.",
        attributes: &["memtel.component"],
        observe: |s, emit| {
            for c in &s.components {
                emit(
                    Num::U(c.bytes),
                    &[KeyValue::new("memtel.component", Value::from(c.name.clone()))],
                );
            }
            if let Some(other) = s.other_bytes {
                emit(Num::U(other), &[KeyValue::new("memtel.component", OTHER_COMPONENT)]);
            }
        },
    },
    MetricDef {
        name: "memtel.component.allocated",
        instrument: Instrument::CounterU64,
        unit: "By",
        description: "The cumulative bytes allocated by each component, measured by the tracking allocator.",
        attributes: &["memtel.component"],
        observe: |s, emit| {
            for c in &s.components {
                if let Some(total) = c.allocated_total_bytes {
                    emit(
                        Num::U(total),
                        &[KeyValue::new("memtel.component", Value::from(c.name.clone()))],
                    );
                }
            }
            if let Some(total) = s.other_allocated_total_bytes {
                emit(Num::U(total), &[KeyValue::new("memtel.component", OTHER_COMPONENT)]);
            }
        },
    },
    MetricDef {
        name: "memtel.alloc.cache",
        instrument: Instrument::UpDownCounterI64,
        unit: "By",
        description: "The bytes of freed small allocations the tracking allocator keeps in its per-thread lists for reuse.",
        attributes: &[],
        // Observed only with the tracking allocator, like `memtel.component.allocated`.
        observe: |s, emit| bytes(s.allocator_cache_bytes, emit),
    },
    MetricDef {
        name: "memtel.cleanup.runs",
        instrument: Instrument::CounterU64,
        unit: "{run}",
        description: "The cleanup cycles a memory manager ran on entering a pressure level.",
        attributes: &[],
        observe: |s, emit| emit(Num::U(s.actions.cleanup_runs), &[]),
    },
    MetricDef {
        name: "memtel.cleanup.freed",
        instrument: Instrument::CounterU64,
        unit: "By",
        description: "The heap bytes cleanup cycles freed, measured before and after.",
        attributes: &[],
        observe: |s, emit| emit(Num::U(s.actions.cleanup_freed_bytes), &[]),
    },
    MetricDef {
        name: "memtel.gc.runs",
        instrument: Instrument::CounterU64,
        unit: "{run}",
        description: "The allocator purges a memory manager ran.",
        attributes: &[],
        observe: |s, emit| emit(Num::U(s.actions.gc_runs), &[]),
    },
    MetricDef {
        name: "memtel.gc.freed",
        instrument: Instrument::CounterU64,
        unit: "By",
        description: "The resident bytes allocator purges returned to the system, measured before and after.",
        attributes: &[],
        observe: |s, emit| emit(Num::U(s.actions.gc_freed_bytes), &[]),
    },
    MetricDef {
        name: "memtel.psi.stall.time",
        instrument: Instrument::CounterF64,
        unit: "s",
        description: "The total time tasks stalled on memory, from pressure stall information.",
        attributes: &["memtel.psi.scope"],
        observe: |s, emit| {
            if let Some(psi) = s.kernel.psi {
                emit(
                    Num::F(psi.some.total_us as f64 / 1e6),
                    &[KeyValue::new("memtel.psi.scope", "some")],
                );
                if let Some(full) = psi.full {
                    emit(
                        Num::F(full.total_us as f64 / 1e6),
                        &[KeyValue::new("memtel.psi.scope", "full")],
                    );
                }
            }
        },
    },
    MetricDef {
        name: "memtel.psi.pressure",
        instrument: Instrument::GaugeF64,
        unit: "1",
        description: "The share of time tasks stalled on memory over each window, from pressure stall information.",
        attributes: &["memtel.psi.scope", "memtel.psi.window"],
        observe: |s, emit| {
            let Some(psi) = s.kernel.psi else { return };
            for (scope, line) in [("some", Some(psi.some)), ("full", psi.full)] {
                let Some(line) = line else { continue };
                for (window, avg) in [("10s", line.avg10), ("60s", line.avg60), ("300s", line.avg300)] {
                    emit(
                        Num::F(avg / 100.0),
                        &[
                            KeyValue::new("memtel.psi.scope", scope),
                            KeyValue::new("memtel.psi.window", window),
                        ],
                    );
                }
            }
        },
    },
    MetricDef {
        name: "memtel.cgroup.events",
        instrument: Instrument::CounterU64,
        unit: "{event}",
        description: "The memory events of the process's cgroup, by event.",
        attributes: &["memtel.cgroup.event"],
        observe: |s, emit| {
            let Some(events) = s.kernel.cgroup.as_ref().and_then(|c| c.events) else {
                return;
            };
            for (event, count) in [
                ("high", events.high),
                ("max", events.max),
                ("oom", events.oom),
                ("oom_kill", events.oom_kill),
            ] {
                if let Some(count) = count {
                    emit(Num::U(count), &[KeyValue::new("memtel.cgroup.event", event)]);
                }
            }
        },
    },
    MetricDef {
        name: "memtel.memory.growth_rate",
        instrument: Instrument::GaugeF64,
        unit: "By/s",
        description: "The growth rate of resident memory's floor over the history's trend window (Theil-Sen slope).",
        attributes: &[],
        observe: |s, emit| {
            if let Some(t) = &s.trends {
                emit(Num::F(t.growth.rate_bytes_per_sec), &[]);
            }
        },
    },
    MetricDef {
        name: "memtel.memory.time_to_limit",
        instrument: Instrument::GaugeF64,
        unit: "s",
        description: "At the current growth rate, the time until resident memory reaches the limit; observed only while it grows toward one.",
        attributes: &[],
        observe: |s, emit| {
            if let Some(ttl) = s.trends.as_ref().and_then(|t| t.time_to_limit) {
                emit(Num::F(ttl.as_secs_f64()), &[]);
            }
        },
    },
    MetricDef {
        name: "memtel.component.growth_rate",
        instrument: Instrument::GaugeF64,
        unit: "By/s",
        description: "The growth rate of each component's floor over the history's trend window (Theil-Sen slope).",
        attributes: &["memtel.component"],
        observe: |s, emit| {
            for c in s.trends.iter().flat_map(|t| &t.components) {
                emit(
                    Num::F(c.growth.rate_bytes_per_sec),
                    &[KeyValue::new("memtel.component", Value::from(c.name.clone()))],
                );
            }
        },
    },
    MetricDef {
        name: "memtel.component.leak_suspected",
        instrument: Instrument::GaugeI64,
        unit: "1",
        description: "1 while a component's floor shows sustained growth (a suspected leak), else 0.",
        attributes: &["memtel.component"],
        observe: |s, emit| {
            for c in s.trends.iter().flat_map(|t| &t.components) {
                emit(
                    Num::U(u64::from(c.leak_suspected())),
                    &[KeyValue::new("memtel.component", Value::from(c.name.clone()))],
                );
            }
        },
    },
];
