//! jemalloc's pools as memtel reports them: a component keeping 1 in 32 of many 64-byte
//! allocations (64 to a slab) sees that class in its arena used about 1/32, and every figure matches
//! jemalloc's own `stats.arenas.<i>.bins.<j>` read here.
#![cfg(feature = "jemalloc")]

use tikv_jemalloc_ctl::raw;

#[global_allocator]
static GLOBAL: memtel::alloc::TrackingAllocator<tikv_jemallocator::Jemalloc> =
    memtel::alloc::TrackingAllocator::new(tikv_jemallocator::Jemalloc);

fn read(name: &str) -> usize {
    let name = format!("{name}\0");
    // SAFETY: the names read here are size_t statistics.
    unsafe { raw::read::<usize>(name.as_bytes()) }.expect(&name)
}

#[test]
fn one_in_32_kept_shows_as_a_32nd_of_the_slabs_used() {
    let component = memtel::component("sparse");
    // In a thread of its own, whose exit returns its cached regions to the arena.
    let kept: Vec<Box<[u8; 64]>> = std::thread::spawn(move || {
        component.in_scope(|| {
            let all: Vec<Box<[u8; 64]>> = (0..32_768).map(|i| Box::new([i as u8; 64])).collect();
            all.into_iter().step_by(32).collect()
        })
    })
    .join()
    .expect("thread");
    assert_eq!(kept.len(), 1024);

    let pools = memtel::memory_pools().expect("jemalloc stats");
    let arena = pools
        .iter()
        .find(|a| a.component == Some("sparse"))
        .expect("the component's arena");
    let class = arena.classes.iter().find(|c| c.size == 64).expect("the 64-byte class");
    // Every slab keeps some of its regions: none is freed whole.
    assert!(class.regions_per_slab >= 32, "{class:?}");
    assert!(
        (0.025..=0.045).contains(&class.utilization),
        "utilization {} with 1 in 32 kept: {class:?}",
        class.utilization
    );
    // jemalloc's own figures, read independently (the stats were refreshed by the call).
    // SAFETY: "arenas.nbins" reads as an unsigned.
    let nbins = unsafe { raw::read::<u32>(b"arenas.nbins\0") }.expect("arenas.nbins") as usize;
    let bin = (0..nbins)
        .find(|j| read(&format!("arenas.bin.{j}.size")) == 64)
        .expect("bin");
    let i = arena.index;
    let curregs = read(&format!("stats.arenas.{i}.bins.{bin}.curregs")) as u64;
    let curslabs = read(&format!("stats.arenas.{i}.bins.{bin}.curslabs")) as u64;
    let slab_size = read(&format!("arenas.bin.{bin}.slab_size")) as u64;
    assert_eq!(class.live_regions, curregs);
    assert_eq!(class.slabs, curslabs);
    assert_eq!(class.live_bytes, curregs * 64);
    assert_eq!(class.held_bytes, curslabs * slab_size);
    assert!(class.live_regions >= 1024, "{class:?}");
    let held_vs_live = class.held_bytes as f64 / class.live_bytes as f64;
    assert!((24.0..=40.0).contains(&held_vs_live), "held ÷ live {held_vs_live}");
    drop(kept);
}
