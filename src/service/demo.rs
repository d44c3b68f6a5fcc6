//! The demo workload: four components that really allocate, hold and free memory,
//! each on its own rhythm, and report the bytes they hold.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memtel::MemoryMonitor;

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
    // A bounded cache: grows to a plateau, then evicts the oldest entry per insert.
    Rhythm {
        name: "cache",
        chunk: 512 << 10,
        period: Duration::from_millis(100),
        max_chunks: 40,
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

/// Registers the four components on `monitor` and spawns their tasks on the current runtime.
pub(crate) fn start(monitor: &MemoryMonitor) -> Result<(), memtel::Error> {
    for rhythm in RHYTHMS {
        let held = Arc::new(AtomicU64::new(0));
        let reported = Arc::clone(&held);
        monitor.component(rhythm.name, move || reported.load(Ordering::Relaxed))?;
        tokio::spawn(run(rhythm, held));
    }
    Ok(())
}

async fn run(rhythm: Rhythm, held: Arc<AtomicU64>) {
    let mut chunks: VecDeque<Vec<u8>> = VecDeque::with_capacity(rhythm.max_chunks);
    let mut tick = tokio::time::interval(rhythm.period);
    let mut fill = 1u8;
    loop {
        tick.tick().await;
        if chunks.len() >= rhythm.max_chunks {
            chunks.drain(..rhythm.release.min(chunks.len()));
        }
        // Written, not just reserved, so the pages are resident.
        chunks.push_back(vec![fill; rhythm.chunk]);
        fill = fill.wrapping_add(1).max(1);
        let bytes: usize = chunks.iter().map(Vec::capacity).sum();
        held.store(bytes as u64, Ordering::Relaxed);
    }
}
