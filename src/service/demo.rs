//! The demo workload: four components that really allocate, hold and free memory,
//! each on its own rhythm. None reports its own bytes: the tracking allocator
//! attributes them. `extraction` and `browser` work inside tracing spans with a
//! `component` field (so their spans also carry `memtel.alloc.*`); `cache` and `api`
//! run as futures scoped with `in_component`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memtel::{InComponent, MemoryManager, Pressure};

/// One component's rhythm: every `period` it takes a `chunk`; at `max_chunks` it
/// releases `release` of the oldest ones.
struct Rhythm {
    name: &'static str,
    chunk: usize,
    period: Duration,
    max_chunks: usize,
    release: usize,
}

const RHYTHMS: [Rhythm; 4] = [
    // Parses pages: a sawtooth that fills up and clears at once.
    Rhythm {
        name: "extraction",
        chunk: 1 << 20,
        period: Duration::from_millis(150),
        max_chunks: 24,
        release: 24,
    },
    // A cache: grows to a plateau, then evicts the oldest entry per insert. Its
    // cleanup hook empties it when memory pressure rises.
    Rhythm {
        name: "cache",
        chunk: 1 << 20,
        period: Duration::from_millis(100),
        max_chunks: 64,
        release: 1,
    },
    // Browser pages: big, slow, halved when full.
    Rhythm {
        name: "browser",
        chunk: 4 << 20,
        period: Duration::from_millis(900),
        max_chunks: 10,
        release: 5,
    },
    // Request buffers: small and fast.
    Rhythm {
        name: "api",
        chunk: 64 << 10,
        period: Duration::from_millis(20),
        max_chunks: 96,
        release: 64,
    },
];

/// Spawns the four components' tasks on the current runtime and registers the
/// cache's cleanup hook on `manager`. With `leak_mb_per_min` above 0 the cache also keeps
/// that many MB per minute that it never evicts (and its hook never clears): a leak.
pub(crate) fn start(manager: MemoryManager, leak_mb_per_min: f64) -> MemoryManager {
    let cache: Cache = Arc::default();
    for rhythm in RHYTHMS {
        match rhythm.name {
            "extraction" | "browser" => tokio::spawn(run_in_spans(rhythm)),
            "cache" => tokio::spawn(
                run_cache(rhythm, Arc::clone(&cache), leak_mb_per_min).in_component(memtel::component("cache")),
            ),
            name => tokio::spawn(run(rhythm).in_component(memtel::component(name))),
        };
    }
    manager.on_pressure(Pressure::Warning, "demo.cache.clear", move || {
        let cache = Arc::clone(&cache);
        async move {
            let dropped = std::mem::take(&mut *cache.lock().unwrap_or_else(|p| p.into_inner()));
            tracing::info!(entries = dropped.len(), "demo cache cleared");
        }
    })
}

type Cache = Arc<Mutex<VecDeque<Vec<u8>>>>;

/// The cache's loop: the same rhythm, on the shared entries the hook can clear; and the
/// leak, entries kept apart that nothing ever frees.
async fn run_cache(rhythm: Rhythm, cache: Cache, leak_mb_per_min: f64) {
    let mut tick = tokio::time::interval(rhythm.period);
    let mut fill = 1u8;
    let mut leaked: Vec<Vec<u8>> = Vec::new();
    let started = tokio::time::Instant::now();
    let mut leaked_bytes = 0f64;
    loop {
        tick.tick().await;
        {
            let mut entries = cache.lock().unwrap_or_else(|p| p.into_inner());
            step(&rhythm, &mut entries, &mut fill);
        }
        if leak_mb_per_min > 0.0 {
            // By elapsed time, not ticks: a late tick leaks what was due.
            let due = leak_mb_per_min * 1_048_576.0 / 60.0 * started.elapsed().as_secs_f64();
            let more = (due - leaked_bytes).max(0.0) as usize;
            if more > 0 {
                leaked.push(vec![fill; more]);
                leaked_bytes += more as f64;
            }
        }
    }
}

/// Each step runs in its own span named after the component.
async fn run_in_spans(rhythm: Rhythm) {
    let mut chunks: VecDeque<Vec<u8>> = VecDeque::with_capacity(rhythm.max_chunks);
    let mut tick = tokio::time::interval(rhythm.period);
    let mut fill = 1u8;
    loop {
        tick.tick().await;
        let span = tracing::info_span!("demo.step", component = rhythm.name);
        span.in_scope(|| step(&rhythm, &mut chunks, &mut fill));
    }
}

/// The whole loop runs in the component scope set by `in_component`.
async fn run(rhythm: Rhythm) {
    let mut chunks: VecDeque<Vec<u8>> = VecDeque::with_capacity(rhythm.max_chunks);
    let mut tick = tokio::time::interval(rhythm.period);
    let mut fill = 1u8;
    loop {
        tick.tick().await;
        step(&rhythm, &mut chunks, &mut fill);
    }
}

fn step(rhythm: &Rhythm, chunks: &mut VecDeque<Vec<u8>>, fill: &mut u8) {
    if chunks.len() >= rhythm.max_chunks {
        chunks.drain(..rhythm.release.min(chunks.len()));
    }
    // Written, not just reserved, so the pages are resident.
    chunks.push_back(vec![*fill; rhythm.chunk]);
    *fill = fill.wrapping_add(1).max(1);
}
