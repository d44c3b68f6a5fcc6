//! jemalloc's memory pools: per arena and size class, live regions against slab capacity
//! (`stats.arenas.<i>.bins.<j>.*`), and each arena's active, dirty and muzzy pages.

use tikv_jemalloc_ctl::raw;

/// One size class of one arena.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "http", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ClassPool {
    /// The class's region size, bytes.
    pub size: u64,
    /// Regions in use (`curregs`).
    pub live_regions: u64,
    /// Slabs holding the class (`curslabs`).
    pub slabs: u64,
    /// Regions per slab (`arenas.bin.<j>.nregs`).
    pub regions_per_slab: u64,
    /// Live regions ÷ the slabs' regions.
    pub utilization: f64,
    /// Bytes of the slabs (`curslabs × slab_size`): what the class holds.
    pub held_bytes: u64,
    /// Bytes of the live regions (`curregs × size`).
    pub live_bytes: u64,
}

/// One arena.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "http", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ArenaPool {
    /// The arena's index.
    pub index: u32,
    /// The component whose allocations it holds (memtel's per-component arenas), or
    /// `None` for jemalloc's own.
    pub component: Option<&'static str>,
    /// Bytes of active pages.
    pub active_bytes: u64,
    /// Bytes of dirty pages: freed, kept for reuse, still resident.
    pub dirty_bytes: u64,
    /// Bytes of muzzy pages: freed and lazily purged.
    pub muzzy_bytes: u64,
    /// Each size class with slabs in this arena.
    pub classes: Vec<ClassPool>,
}

fn read<T: Copy>(name: &str) -> Option<T> {
    let name = format!("{name}\0");
    // SAFETY: every name passed here reads as the type the caller asks for.
    unsafe { raw::read::<T>(name.as_bytes()) }.ok()
}

/// Every arena's pools now (the stats are refreshed first); `None` without jemalloc stats.
pub fn memory_pools() -> Option<Vec<ArenaPool>> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let narenas = read::<u32>("arenas.narenas")?;
    let nbins = read::<u32>("arenas.nbins")?;
    let page = read::<usize>("arenas.page")? as u64;
    let bins: Vec<(u64, u64, u64)> = (0..nbins)
        .map(|j| {
            Some((
                read::<usize>(&format!("arenas.bin.{j}.size"))? as u64,
                u64::from(read::<u32>(&format!("arenas.bin.{j}.nregs"))?),
                read::<usize>(&format!("arenas.bin.{j}.slab_size"))? as u64,
            ))
        })
        .collect::<Option<_>>()?;
    let components = crate::alloc::component_arena_names();
    let mut arenas = Vec::new();
    for i in 0..narenas {
        // An index without an initialized arena has no stats.
        let Some(active) = read::<usize>(&format!("stats.arenas.{i}.pactive")) else {
            continue;
        };
        let classes = bins
            .iter()
            .enumerate()
            .filter_map(|(j, &(size, nregs, slab_size))| {
                let slabs = read::<usize>(&format!("stats.arenas.{i}.bins.{j}.curslabs"))? as u64;
                if slabs == 0 {
                    return None;
                }
                let live = read::<usize>(&format!("stats.arenas.{i}.bins.{j}.curregs"))? as u64;
                Some(ClassPool {
                    size,
                    live_regions: live,
                    slabs,
                    regions_per_slab: nregs,
                    utilization: live as f64 / (slabs * nregs).max(1) as f64,
                    held_bytes: slabs * slab_size,
                    live_bytes: live * size,
                })
            })
            .collect();
        arenas.push(ArenaPool {
            index: i,
            component: components.iter().find(|(index, _)| *index == i).map(|(_, name)| *name),
            active_bytes: active as u64 * page,
            dirty_bytes: read::<usize>(&format!("stats.arenas.{i}.pdirty")).unwrap_or(0) as u64 * page,
            muzzy_bytes: read::<usize>(&format!("stats.arenas.{i}.pmuzzy")).unwrap_or(0) as u64 * page,
            classes,
        });
    }
    Some(arenas)
}
