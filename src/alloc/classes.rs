//! jemalloc's small size classes, as placement uses them.
//!
//! jemalloc serves every small request from a slab of equal regions of its size class:
//! 8, then the multiples of 16 up to 128, then four evenly spaced classes in each
//! power-of-two interval (160, 192, 224, 256, 320, …). Placement caches freed regions by
//! class, so the class of a request must be known without asking jemalloc: the table
//! below is computed at compile time from that rule and checked against jemalloc's own
//! `nallocx` (see [`matches_jemalloc`]) before any allocation is placed.

use tikv_jemalloc_sys as sys;

/// The largest class placed: bigger requests keep their tag. (Larger classes are whole
/// pages, and jemalloc hands freed large extents of an explicit arena back more slowly
/// than its own: they would cost more resident memory than the tag.)
pub(crate) const PLACED_MAX: usize = 14_336;

/// How many classes there are from 8 bytes to [`PLACED_MAX`].
pub(crate) const CLASSES: usize = count_classes();

/// `CLASS_OF[(size + 7) >> 3]` is the class index of a request of `size` bytes.
static CLASS_OF: [u8; PLACED_MAX / 8 + 1] = class_of_table();

/// Each class's size in bytes.
pub(crate) const CLASS_SIZE: [u32; CLASSES] = class_sizes();

/// The class size jemalloc rounds a small request up to.
const fn round_to_class(size: usize) -> usize {
    if size <= 8 {
        8
    } else if size <= 128 {
        (size + 15) & !15
    } else {
        // Four classes in (2^lg, 2^(lg+1)]: steps of 2^(lg-2).
        let lg = usize::BITS - 1 - (size - 1).leading_zeros();
        let step = 1 << (lg - 2);
        (size + step - 1) & !(step - 1)
    }
}

const fn count_classes() -> usize {
    let (mut count, mut size) = (0, 8);
    while size <= PLACED_MAX {
        count += 1;
        size = round_to_class(size + 1);
    }
    count
}

const fn class_sizes() -> [u32; CLASSES] {
    let mut sizes = [0; CLASSES];
    let (mut index, mut size) = (0, 8);
    while index < CLASSES {
        sizes[index] = size as u32;
        index += 1;
        size = round_to_class(size + 1);
    }
    sizes
}

const fn class_of_table() -> [u8; PLACED_MAX / 8 + 1] {
    let sizes = class_sizes();
    let mut table = [0; PLACED_MAX / 8 + 1];
    let mut entry = 0;
    while entry < table.len() {
        // The largest request that maps to this entry.
        let class = round_to_class(if entry == 0 { 1 } else { entry * 8 });
        let mut index = 0;
        while sizes[index] as usize != class {
            index += 1;
        }
        table[entry] = index as u8;
        entry += 1;
    }
    table
}

/// The largest alignment placed: a slab starts on a page.
const PLACED_ALIGN_MAX: usize = 4096;

/// The class index of a request of `size` bytes aligned to `align`, if it is placed:
/// up to [`PLACED_MAX`] bytes once rounded up to its alignment, which is at most a page.
/// (Regions lie at multiples of their class size from a page boundary, so a class that
/// is a multiple of the alignment honours it — the class of the rounded-up size, as
/// jemalloc's own `sz_sa2u` picks. For alignments known at compile time, as most are,
/// the rounding folds away.)
#[inline(always)]
pub(crate) fn placed_class(size: usize, align: usize) -> Option<usize> {
    if align > PLACED_ALIGN_MAX {
        return None;
    }
    class_of((size.max(1) + (align - 1)) & !(align - 1))
}

/// The class index of a request of `key` bytes (a size already rounded to its
/// alignment), if it is at most [`PLACED_MAX`].
#[inline(always)]
pub(crate) fn class_of(key: usize) -> Option<usize> {
    if key <= PLACED_MAX {
        Some(usize::from(CLASS_OF[(key + 7) >> 3]))
    } else {
        None
    }
}

/// Whether the table gives, for every request up to [`PLACED_MAX`], the class this
/// jemalloc build rounds it to (it could differ only with a nonstandard build); if not,
/// nothing is placed.
pub(crate) fn matches_jemalloc() -> bool {
    (1..=PLACED_MAX).all(|size| {
        let class = CLASS_SIZE[usize::from(CLASS_OF[(size + 7) >> 3])] as usize;
        // SAFETY: nallocx only computes a size.
        class == unsafe { sys::nallocx(size, 0) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_jemallocs() {
        assert!(matches_jemalloc());
        assert_eq!(CLASS_SIZE[..10], [8, 16, 32, 48, 64, 80, 96, 112, 128, 160]);
        assert_eq!(CLASS_SIZE[CLASSES - 1] as usize, PLACED_MAX);
    }

    #[test]
    fn alignment_picks_a_class_that_honours_it() {
        let class = |size, align| placed_class(size, align).map(|c| CLASS_SIZE[c]);
        assert_eq!(class(8, 8), Some(8));
        assert_eq!(class(8, 16), Some(16));
        assert_eq!(class(1, 16), Some(16));
        assert_eq!(class(40, 16), Some(48));
        assert_eq!(class(PLACED_MAX, 8), Some(PLACED_MAX as u32));
        assert_eq!(class(PLACED_MAX, 16), Some(PLACED_MAX as u32));
        assert_eq!(class(PLACED_MAX + 1, 1), None);
        assert_eq!(class(0, 16), Some(16));
        assert_eq!(class(80, 64), Some(128));
        assert_eq!(class(100, 4096), Some(4096));
        assert_eq!(class(64, 8192), None);
        for size in 1..=PLACED_MAX {
            for align in [1, 2, 4, 8, 16, 32, 64, 256, 4096] {
                if size.next_multiple_of(align) > PLACED_MAX {
                    assert_eq!(class(size, align), None);
                    continue;
                }
                let c = class(size, align).expect("placed") as usize;
                assert!(c >= size && c.is_multiple_of(align), "{size} aligned {align} → {c}");
            }
        }
    }
}
