//! The stacks of sampled allocations: walked by frame pointers when the frames keep them
//! (checked against a DWARF unwind of the same stack, first and then every so often), else
//! unwound from the DWARF tables: by `framehop` with its cache of unwind rules (x86_64, see
//! `eh_frame`), or by `backtrace` where that cannot reach the stack's end.
//!
//! A walk costs a few instructions per frame; framehop, once it has seen a stack's code,
//! about 160 per frame; `backtrace` about 35,000 for a 20-frame stack, which at a 512 KiB
//! interval made an allocation-bound loop 1.5× slower. Rust's standard library keeps frame
//! pointers; the rest of a program does when built with `-C force-frame-pointers=yes`. A
//! program built without them (or a stack through C code that omits them) fails the check,
//! and every stack is then unwound from DWARF: the check costs one DWARF unwind per
//! [`CHECK_EVERY`] samples.
//!
//! The walk reads only within the thread's stack (its top from `pthread_getattr_np`, once per
//! thread; its bottom the walk's own frame), each frame record above the last: a function
//! that uses the frame-pointer register for something else cannot make it read elsewhere,
//! only produce a stack that fails the check.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

const UNDECIDED: u8 = 0;
const FRAME_POINTERS: u8 = 1;
const DWARF: u8 = 2;
/// How stacks are captured: undecided (each sample walked and checked), by frame pointers,
/// or by DWARF.
static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);
/// Checks passed while undecided.
static AGREED: AtomicU32 = AtomicU32::new(0);
/// Samples whose stack was walked (every [`CHECK_EVERY`]th is checked).
static WALKED: AtomicU64 = AtomicU64::new(0);
/// Checks that must pass before frame pointers are trusted.
const CHECKS_TO_TRUST: u32 = 8;
/// Once trusted, one sample in this many is checked again.
const CHECK_EVERY: u64 = 256;
/// Frames a DWARF unwind may find beyond a walk's last (thread start-up code without frame
/// pointers, such as glibc's `start_thread` and `clone3`).
const UNWALKED_OUTERMOST: usize = 3;

/// Which unwinder heap profiling uses for sampled stacks: `"frame pointers"`, `"dwarf"`, or
/// `"undecided"` until enough samples were checked (see the README's heap profiling section).
///
/// ```
/// let unwinder = memtel::alloc::heap_profile_unwinder();
/// assert!(["frame pointers", "dwarf", "undecided"].contains(&unwinder));
/// ```
pub fn heap_profile_unwinder() -> &'static str {
    match MODE.load(Relaxed) {
        FRAME_POINTERS => "frame pointers",
        DWARF => "dwarf",
        _ => "undecided",
    }
}

/// Fills `frames` with the return addresses of the calling stack, innermost first; how many.
/// `stack_top` is the thread's cached stack top (0 before it was read, 1 if unknown).
#[inline(never)]
pub(crate) fn capture(stack_top: &Cell<usize>, frames: &mut [usize]) -> usize {
    let mode = MODE.load(Relaxed);
    let top = thread_stack_top(stack_top);
    if mode == DWARF || top <= 1 || !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return dwarf(top, frames);
    }
    let walked = walk(top, frames);
    let n = WALKED.fetch_add(1, Relaxed);
    if mode == FRAME_POINTERS && !n.is_multiple_of(CHECK_EVERY) {
        return walked;
    }
    let mut unwound = [0usize; super::sampler::DEPTH];
    let full = dwarf(top, &mut unwound[..frames.len().min(super::sampler::DEPTH)]);
    if agrees(&frames[..walked], &unwound[..full], frames.len()) {
        if mode == UNDECIDED && AGREED.fetch_add(1, Relaxed) + 1 >= CHECKS_TO_TRUST {
            let _ = MODE.compare_exchange(UNDECIDED, FRAME_POINTERS, Relaxed, Relaxed);
        }
        walked
    } else {
        MODE.store(DWARF, Relaxed);
        frames[..full].copy_from_slice(&unwound[..full]);
        full
    }
}

/// A DWARF unwind of the calling stack into `frames`; how many frames. By `framehop` with
/// its cache of rules where it reaches the stack's end (see `eh_frame`), else by
/// `backtrace`. `top` is the thread's stack top (1 if unknown).
fn dwarf(top: usize, frames: &mut [usize]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if top > 1 {
        if let Some(depth) = super::eh_frame::unwind(top, frames) {
            return depth;
        }
    }
    let _ = top;
    let mut depth = 0;
    // SAFETY: tracing without synchronization only risks a garbled stack if another thread
    // traces at the same time through the same unwinder state; the unwinder used here is
    // thread-safe. It does not allocate.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            if depth >= frames.len() {
                return false;
            }
            frames[depth] = frame.ip() as usize;
            depth += 1;
            depth < frames.len()
        });
    }
    depth
}

/// Whether a walk agrees with a DWARF unwind of the same stack: from the walk's second
/// address on (its first is inside [`capture`], at another call than the unwind's), the
/// unwind holds the same addresses in the same order, and no more frames than start-up
/// code beyond them (unless `capacity` cut both short).
fn agrees(walked: &[usize], unwound: &[usize], capacity: usize) -> bool {
    let Some(first) = walked.get(1) else {
        return false;
    };
    let Some(at) = unwound.iter().position(|a| a == first) else {
        return false;
    };
    let (walked, unwound) = (&walked[1..], &unwound[at..]);
    let common = walked.len().min(unwound.len());
    walked[..common] == unwound[..common]
        && (walked.len() + 1 >= capacity || unwound.len() <= walked.len() + UNWALKED_OUTERMOST)
}

/// The thread's stack top, read once (0: not yet, 1: unknown).
fn thread_stack_top(cached: &Cell<usize>) -> usize {
    if cached.get() == 0 {
        cached.set(read_stack_top().unwrap_or(1));
    }
    cached.get()
}

/// The highest address of this thread's stack, from `pthread_getattr_np`. (For the main
/// thread glibc reads `/proc/self/maps` with its own `malloc`, never the Rust allocator.)
pub(super) fn read_stack_top() -> Option<usize> {
    // SAFETY: `attr` is initialized by `pthread_getattr_np` before it is read, and
    // destroyed once; the out-pointers are valid locals.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
        let got = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (got == 0 && !addr.is_null()).then(|| addr as usize + size)
    }
}

/// Walks the frame records from this function's own up, while each lies within the stack
/// (above the last, below `top`), into `frames`; how many return addresses.
#[inline(never)]
fn walk(top: usize, frames: &mut [usize]) -> usize {
    let mut fp: usize;
    // SAFETY: reads a register.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags));
        #[cfg(target_arch = "aarch64")]
        std::arch::asm!("mov {}, x29", out(reg) fp, options(nomem, nostack, preserves_flags));
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            fp = 0;
        }
    }
    // Everything from this frame up to the stack's top is mapped: the live stack.
    let bottom = std::ptr::addr_of!(fp) as usize;
    let mut depth = 0;
    while depth < frames.len() && fp >= bottom && fp.is_multiple_of(8) && fp.saturating_add(16) <= top {
        // SAFETY: [fp, fp + 16) lies within this thread's live stack (checked above).
        let (next, ret) = unsafe {
            (
                std::ptr::read_volatile(fp as *const usize),
                std::ptr::read_volatile((fp + 8) as *const usize),
            )
        };
        if ret == 0 {
            break;
        }
        frames[depth] = ret;
        depth += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_agrees_only_with_the_same_stack() {
        let unwound = [1, 2, 10, 11, 12, 13, 90, 91];
        // The walk's first address is inside `capture`: not compared.
        assert!(agrees(&[7, 10, 11, 12, 13], &unwound, 64));
        // A missing frame in the middle (a function without a frame pointer).
        assert!(!agrees(&[7, 10, 12, 13], &unwound, 64));
        // Stopping well before the unwind's last frames.
        assert!(!agrees(&[7, 10, 11], &unwound, 64));
        // Cut short by the capacity.
        assert!(agrees(&[7, 10, 11], &unwound, 3));
        assert!(!agrees(&[7, 99, 11, 12, 13], &unwound, 64));
        assert!(!agrees(&[7], &unwound, 64));
    }

    #[test]
    fn a_walk_stays_in_the_stack_and_a_top_is_found() {
        let top = read_stack_top().expect("this thread's stack");
        let here = 0u8;
        assert!((std::ptr::addr_of!(here) as usize) < top);
        let mut frames = [0usize; 64];
        // Whatever this build keeps in the frame-pointer register, the walk returns.
        let depth = walk(top, &mut frames);
        assert!(depth <= frames.len());
    }
}
