//! The tracking allocator's per-component counts against an independent count of the
//! bytes requested (support/truth.rs), across threads, components and async tasks.
#![cfg(feature = "jemalloc")]

#[path = "support/truth.rs"]
mod truth;

use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};

use memtel::alloc::TrackingAllocator;
use memtel::{component, InComponent};
use truth::{record, Recorded, Tally, Truth};

#[global_allocator]
static GLOBAL: Truth<TrackingAllocator<tikv_jemallocator::Jemalloc>> =
    Truth(TrackingAllocator::new(tikv_jemallocator::Jemalloc));

#[test]
fn collections_vec_string_box_hashmap_and_realloc_chains_are_exact() {
    let c = component("acc_collections");
    let base = c.live_bytes();
    let (held, allocated, freed) = record(|| {
        c.in_scope(|| {
            let mut numbers: Vec<u64> = Vec::new();
            for i in 0..10_000 {
                numbers.push(i); // a realloc chain: 4, 8, 16, ... elements
            }
            let mut text = String::new();
            for i in 0..2_000 {
                text.push_str(&i.to_string());
            }
            let boxed = Box::new([7u8; 1000]);
            let mut map: HashMap<u64, String> = HashMap::new();
            for i in 0..1_000 {
                map.insert(i, format!("value {i}"));
            }
            let mut shrunk = vec![1u8; 100_000];
            shrunk.truncate(10);
            shrunk.shrink_to_fit(); // realloc down
            (numbers, text, boxed, map, shrunk)
        })
    });
    assert!(allocated > 100_000 && freed > 0, "the region did allocate and free");
    assert_eq!(
        c.live_bytes() - base,
        allocated - freed,
        "live bytes = requested − freed, exactly"
    );
    assert!(c.allocated_bytes() >= allocated);
    let expected_vec = held.0.capacity() * 8 + held.1.capacity() + 1000 + held.4.capacity();
    assert!(c.live_bytes() - base >= expected_vec as u64);
    drop(held);
    assert_eq!(c.live_bytes(), base, "everything freed");
}

#[test]
fn frees_on_other_threads_and_in_other_components_credit_the_owner() {
    let owner = component("acc_owner");
    let elsewhere = component("acc_elsewhere");
    let (data, allocated, freed) = record(|| {
        owner.in_scope(|| {
            let big = vec![3u8; 1 << 20];
            let strings: Vec<String> = (0..500).map(|i| format!("s{i:04}")).collect();
            (big, strings)
        })
    });
    assert_eq!(owner.live_bytes(), allocated - freed);
    let before_elsewhere = elsewhere.live_bytes();
    std::thread::spawn(move || elsewhere.in_scope(move || drop(data)))
        .join()
        .unwrap();
    assert_eq!(
        owner.live_bytes(),
        0,
        "freed on another thread, inside another component"
    );
    assert_eq!(
        elsewhere.live_bytes(),
        before_elsewhere,
        "the freeing component is not debited"
    );
    assert_eq!(owner.allocated_bytes(), allocated, "cumulative allocations are kept");
}

#[test]
fn over_aligned_and_zeroed_layouts() {
    let c = component("acc_aligned");
    c.in_scope(|| unsafe {
        for align in [64usize, 4096, 1 << 16] {
            let layout = Layout::from_size_align(100, align).unwrap();
            // black_box: an optimized build may otherwise elide an allocation that never escapes.
            let p = std::hint::black_box(std::alloc::alloc(layout));
            assert!(!p.is_null() && (p as usize).is_multiple_of(align));
            assert_eq!(c.live_bytes(), 100);
            let p = std::hint::black_box(std::alloc::realloc(p, layout, 5000));
            assert!(
                !p.is_null() && (p as usize).is_multiple_of(align),
                "realloc keeps the alignment"
            );
            assert_eq!(c.live_bytes(), 5000);
            std::alloc::dealloc(p, Layout::from_size_align(5000, align).unwrap());
            assert_eq!(c.live_bytes(), 0);
        }
        let layout = Layout::from_size_align(4096, 64).unwrap();
        let p = std::hint::black_box(std::alloc::alloc_zeroed(layout));
        assert!(
            std::slice::from_raw_parts(p, 4096).iter().all(|b| *b == 0),
            "zeroed up to the tag"
        );
        assert_eq!(c.live_bytes(), 4096);
        std::alloc::dealloc(p, layout);
    });
    assert_eq!(c.live_bytes(), 0);
}

#[test]
fn zero_sized_requests_are_served_and_counted_as_zero() {
    // Not through the global allocator (std never asks it for 0 bytes), but the type
    // must hold for any caller.
    let zero = component("acc_zero");
    let tracker = TrackingAllocator::new(std::alloc::System);
    zero.in_scope(|| unsafe {
        let layout = Layout::from_size_align(0, 8).unwrap();
        let p = tracker.alloc(layout);
        assert!(!p.is_null());
        assert_eq!(zero.live_bytes(), 0);
        let p = tracker.realloc(p, layout, 64);
        assert_eq!(zero.live_bytes(), 64);
        tracker.dealloc(p, Layout::from_size_align(64, 8).unwrap());
    });
    assert_eq!(zero.live_bytes(), 0);
}

#[test]
fn threads_beyond_the_shards_and_exited_threads_lose_nothing() {
    let c = component("acc_threads");
    const THREADS: usize = 100; // more than the 64 owned shards, alive at once
    for round in 0..2 {
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    c.in_scope(|| {
                        let garbage = vec![0u8; 4096 + i];
                        drop(garbage);
                        vec![i as u8; 10_000]
                    })
                })
            })
            .collect();
        let held: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(c.live_bytes(), (THREADS * 10_000) as u64, "round {round}");
        drop(held);
        assert_eq!(c.live_bytes(), 0, "round {round}");
    }
}

#[test]
fn async_tasks_migrating_across_workers_are_attributed_on_every_poll() {
    let c = component("acc_async");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let tally = Tally::default();
    let held = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    runtime.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let held = Arc::clone(&held);
                let work = async move {
                    let mut mine = Vec::new();
                    for i in 0..50 {
                        mine.push(vec![t as u8; 1000 + i * 37]);
                        if i % 3 == 0 {
                            mine.remove(0);
                        }
                        tokio::task::yield_now().await; // may resume on the other worker
                    }
                    held.lock().unwrap().extend(mine);
                };
                tokio::spawn(Recorded {
                    inner: Box::pin(work.in_component(c)),
                    tally: tally.clone(),
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    assert!(tally.polls.load(std::sync::atomic::Ordering::SeqCst) >= 8 * 50);
    assert_eq!(
        c.live_bytes() as i64,
        tally.net(),
        "live bytes = what the tasks' polls allocated minus freed, on any worker"
    );
    let kept: usize = held.lock().unwrap().iter().map(Vec::capacity).sum();
    assert!(c.live_bytes() as usize >= kept);
    held.lock().unwrap().clear();
    drop(runtime);
}

#[test]
fn nested_scopes_restore_the_outer_component() {
    let (outer, inner) = (component("acc_outer"), component("acc_inner"));
    let _o = outer.enter();
    assert_eq!(memtel::current_component(), outer);
    {
        let _i = inner.enter();
        assert_eq!(memtel::current_component(), inner);
        let v = vec![0u8; 777];
        assert_eq!(inner.live_bytes(), 777);
        drop(v);
    }
    assert_eq!(memtel::current_component(), outer);
    let v = vec![0u8; 555];
    assert_eq!(outer.live_bytes(), 555);
    drop(v);
}
