//! Measured per-component memory: a tracking allocator and component scopes.
//!
//! Install [`TrackingAllocator`] as the global allocator, then make a component
//! current while its code runs — a guard ([`Component::enter`]), a closure
//! ([`Component::in_scope`]), a future ([`InComponent::in_component`]) or a tracing
//! span with a `component` field ([`ComponentLayer`], feature `tracing`). Every heap
//! byte allocated meanwhile is attributed to that component until it is freed,
//! whoever frees it.
//!
//! "Tracked" bytes are the bytes of live Rust heap allocations, as requested (not
//! rounded to size classes). The allocator cannot see memory outside the Rust heap:
//! `mmap`s, C libraries calling `malloc` directly, thread stacks, or a browser
//! subprocess. Report those with
//! [`MemoryMonitor::component`](crate::MemoryMonitor::component); a name that is
//! both tracked and reported shows the sum, with `by_component_source` = `mixed`.
//!
//! ```
//! use memtel::alloc::TrackingAllocator;
//! use memtel::InComponent;
//!
//! #[global_allocator]
//! static GLOBAL: TrackingAllocator<tikv_jemallocator::Jemalloc> =
//!     TrackingAllocator::new(tikv_jemallocator::Jemalloc);
//!
//! let cache = memtel::component("cache");
//! let entries: Vec<String> = cache.in_scope(|| (0..1000).map(|i| i.to_string()).collect());
//! assert!(cache.live_bytes() >= 1000 * std::mem::size_of::<String>() as u64);
//!
//! # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! let api = memtel::component("api");
//! let body = rt.block_on(async { vec![0u8; 4096] }.in_component(api));
//! assert!(api.live_bytes() >= 4096);
//! # drop((entries, body));
//! ```

mod allocator;
#[cfg(feature = "jemalloc")]
mod arenas;
#[cfg(feature = "jemalloc")]
mod bins;
#[cfg(feature = "jemalloc")]
mod chunks;
#[cfg(feature = "jemalloc")]
mod classes;
pub(crate) mod counters;
#[cfg(all(feature = "profiling", target_arch = "x86_64"))]
mod eh_frame;
#[cfg(feature = "tracing")]
mod layer;
pub(crate) mod registry;
#[cfg(feature = "profiling")]
pub(crate) mod sampler;
#[cfg(feature = "jemalloc")]
mod scheme;
mod scope;
#[cfg(all(feature = "jemalloc", feature = "profiling"))]
mod spares;
#[cfg(feature = "profiling")]
mod unwind;
#[cfg(all(feature = "profiling", target_arch = "x86_64"))]
mod unwind_memo;

pub use allocator::TrackingAllocator;
#[cfg(feature = "tracing")]
pub use layer::ComponentLayer;
#[cfg(feature = "profiling")]
pub use sampler::{heap_sample_interval, set_heap_sample_interval};
pub use scope::{component, current_component, Component, ComponentFuture, ComponentGuard, InComponent};
#[cfg(feature = "profiling")]
pub use unwind::heap_profile_unwinder;

pub(crate) use registry::for_each as for_each_component;

/// How many components have a jemalloc arena of their own for their small allocations
/// (see [`TrackingAllocator`]): 0 when the inner allocator is not jemalloc, when the
/// address-space reservation was refused, or before the first allocation.
///
/// ```
/// #[global_allocator]
/// static GLOBAL: memtel::alloc::TrackingAllocator<tikv_jemallocator::Jemalloc> =
///     memtel::alloc::TrackingAllocator::new(tikv_jemallocator::Jemalloc);
///
/// // 64 bytes is a jemalloc size class: placed, it costs 64 bytes, not 80 with a tag.
/// let buffer = memtel::component("parser").in_scope(|| Vec::<u8>::with_capacity(64));
/// assert!(memtel::alloc::component_arenas() >= 1);
/// # drop(buffer);
/// ```
pub fn component_arenas() -> usize {
    #[cfg(feature = "jemalloc")]
    return arenas::count();
    #[cfg(not(feature = "jemalloc"))]
    0
}

/// The jemalloc arenas of each component that has them (one per shard), by arena index.
#[cfg(feature = "jemalloc")]
pub(crate) fn component_arena_names() -> Vec<(u32, &'static str)> {
    (0..counters::SLOTS)
        .flat_map(|slot| arenas::arena_indices(slot).map(move |index| (index, registry::name(slot as u8))))
        .collect()
}

/// Bytes of freed small allocations the tracking allocator keeps in its per-thread lists
/// for reuse (placement only; 0 with tags or another allocator than jemalloc).
///
/// Each thread's lists hold at most 512 KiB, whatever the number of components. The
/// figure is each thread's as it last counted them (every 16 refills or returns to
/// jemalloc, and at exit), so it is within 512 KiB per thread of the bytes held at this
/// instant. With heap profiling, each thread also keeps the last freed sampled allocation
/// of each size class up to 4 KiB for its next sample, at most 26 KiB (counted here at once).
/// The allocations are counted by jemalloc as allocated (`jemalloc.allocated_mb`) and by no component.
///
/// ```
/// #[global_allocator]
/// static GLOBAL: memtel::alloc::TrackingAllocator<tikv_jemallocator::Jemalloc> =
///     memtel::alloc::TrackingAllocator::new(tikv_jemallocator::Jemalloc);
///
/// let strings: Vec<String> = memtel::component("parser").in_scope(|| (0..100).map(|i| i.to_string()).collect());
/// drop(strings);
/// assert!(memtel::alloc::cached_bytes() <= 512 << 10);
/// ```
pub fn cached_bytes() -> u64 {
    #[cfg(all(feature = "jemalloc", feature = "profiling"))]
    return (bins::cached_bytes() + spares::kept_bytes()) as u64;
    #[cfg(all(feature = "jemalloc", not(feature = "profiling")))]
    return bins::cached_bytes() as u64;
    #[cfg(not(feature = "jemalloc"))]
    0
}

#[cfg(feature = "jemalloc")]
pub use scheme::{Scheme, VARIABLE as SCHEME_VARIABLE};

/// Whether the [`TrackingAllocator`] is the global allocator (it has served an allocation).
pub fn tracking_installed() -> bool {
    counters::installed()
}
