//! The `tracking-allocator` crate (0.4) doing the same attribution as memtel: its
//! `Allocator<Jemalloc>` as the global allocator, a global tracker keeping live bytes per
//! allocation group in atomics, tracking enabled, and every workload inside an
//! `AllocationGroupToken` guard.
//!
//! A token is entered through `&mut` and cannot be cloned, so each worker thread (of
//! `realistic` and `dom`) has a token (group) of its own; the tracker's atomics are
//! cache-line padded, so the two threads never share a counter line. Both choices favour
//! this baseline.
//! Part of the allocator comparison; run all of it with `scripts/alloc-bench.sh`.

#[path = "support/alloc_workloads.rs"]
mod workloads;

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Mutex;

use tracking_allocator::{AllocationGroupId, AllocationGroupToken, AllocationRegistry, AllocationTracker, Allocator};
use workloads::{DomCorpus, Scope, WORKERS};

#[global_allocator]
static GLOBAL: Allocator<tikv_jemallocator::Jemalloc> = Allocator::from_allocator(tikv_jemallocator::Jemalloc);

const NAME: &str = "tracking_crate";
const GROUPS: usize = 64;

#[repr(align(128))]
struct Padded(AtomicI64);

/// Live bytes per allocation group (ids past the table share the last entry).
static LIVE: [Padded; GROUPS] = [const { Padded(AtomicI64::new(0)) }; GROUPS];

fn slot(group: &AllocationGroupId) -> usize {
    group.as_usize().get().min(GROUPS - 1)
}

struct LiveBytes;

impl AllocationTracker for LiveBytes {
    fn allocated(&self, _addr: usize, object_size: usize, _wrapped_size: usize, group: AllocationGroupId) {
        LIVE[slot(&group)].0.fetch_add(object_size as i64, Relaxed);
    }

    fn deallocated(
        &self,
        _addr: usize,
        object_size: usize,
        _wrapped_size: usize,
        source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        LIVE[slot(&source)].0.fetch_sub(object_size as i64, Relaxed);
    }
}

/// One token per worker; worker `w` enters token `w`.
struct InGroup([Mutex<AllocationGroupToken>; WORKERS]);

impl InGroup {
    fn live(&self) -> i64 {
        let ids = self.0.each_ref().map(|t| t.lock().expect("token").id());
        ids.iter().map(|id| LIVE[slot(id)].0.load(Relaxed)).sum()
    }
}

impl Scope for InGroup {
    fn run<R>(&self, worker: usize, f: impl FnOnce() -> R) -> R {
        let mut token = self.0[worker].lock().expect("token");
        let _guard = token.enter();
        f()
    }
}

fn main() {
    AllocationRegistry::set_global_tracker(LiveBytes).expect("no tracker set yet");
    AllocationRegistry::enable_tracking();
    let register = || Mutex::new(AllocationGroupToken::register().expect("a group id"));
    let scope = InGroup([register(), register()]);

    workloads::measure_memory(NAME, &scope, || u64::try_from(scope.live()).ok());
    let corpus = DomCorpus::generate();
    let mut c = workloads::criterion();
    workloads::bench_churn(&mut c, NAME, &scope);
    workloads::bench_realistic(&mut c, NAME, &scope);
    workloads::bench_dom(&mut c, NAME, &scope, &corpus);
    eprintln!("attribution: the workers' groups hold {} live bytes", scope.live());
    c.final_summary();
}
