//! DWARF unwinding of the calling thread's stack with `framehop`, from the `.eh_frame_hdr`
//! and `.eh_frame` of every module the loader mapped, read in place in memory.
//!
//! `backtrace` (libgcc's unwinder underneath) finds and interprets each frame's CFI afresh:
//! about 35,000 instructions for a 20-frame stack. framehop keeps the rule it derived for
//! each address in a fixed-size cache, so a stack through code it has seen costs a lookup
//! and a stack read or two per frame. Sampled stacks repeat (the same call sites allocate
//! again and again), so nearly every frame is a hit.
//!
//! framehop's cache is direct-mapped (509 slots by address): two of a stack's frames whose
//! addresses share a slot, which happens in about one process in three given its load
//! address, would evict each other on every sample, and a miss costs some 4,000
//! instructions. So [`WAYS`] caches are used as one set-associative cache: for each slot,
//! which address each cache holds there is kept here, and a frame goes to the cache that
//! holds its address, else replaces one in turn.
//!
//! The module list is read with `dl_iterate_phdr` at the first unwind, and again when an
//! unwind fails and the loader counts loads or unloads since (`dlpi_adds`, `dlpi_subs`).
//! All of this runs with the thread's sampling held off (the sampler's `busy` flag), so
//! what it allocates (the list, the caches, and on a cache miss gimli's evaluation state)
//! is served unsampled. Its stack reads stay within the thread's live stack (from the
//! unwind's own stack pointer to the thread's stack top), so a garbled frame can only end
//! the unwind early: the caller then unwinds that stack with `backtrace`.
//!
//! One unwinder and set of caches (about 70 KiB) serve every thread, behind a spin lock
//! held for one unwind (a microsecond or two); a `fork` child never samples, so never
//! takes it.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, MayAllocateDuringUnwind, Module, Unwinder};

type Policy = MayAllocateDuringUnwind;

/// framehop's cache slots (its `CACHE_ENTRY_COUNT`; another count only costs hit rate).
const SLOTS: usize = 509;
/// framehop caches used as one set-associative cache.
const WAYS: usize = 4;

/// The unwinder over the loaded modules, and its rule caches.
struct Modules {
    unwinder: UnwinderX86_64<&'static [u8], Policy>,
    caches: [CacheX86_64<Policy>; WAYS],
    /// For each slot, the lookup address each cache holds there (0: none).
    held: Box<[[u64; WAYS]; SLOTS]>,
    /// For each slot, the cache whose address is replaced next.
    next: Box<[u8; SLOTS]>,
    /// The loader's loads + unloads when the list was read.
    generation: u64,
}

struct Shared {
    lock: AtomicBool,
    modules: UnsafeCell<Option<Box<Modules>>>,
}

// SAFETY: `modules` is only reached while `lock` is held.
unsafe impl Sync for Shared {}

static SHARED: Shared = Shared {
    lock: AtomicBool::new(false),
    modules: UnsafeCell::new(None),
};

/// Unwinds the calling stack into `frames`: the first address is inside this function,
/// the others are return addresses, innermost first. `top` is the thread's stack top.
/// How many frames, or `None` when the unwind could not reach the stack's end (or the
/// module list could not be read): the caller unwinds another way.
///
/// Must be called with the thread's sampling held off: the first call allocates.
#[inline(never)]
pub(crate) fn unwind(top: usize, frames: &mut [usize]) -> Option<usize> {
    let (pc, sp, bp): (u64, u64, u64);
    // SAFETY: reads the instruction pointer, stack pointer and frame pointer registers.
    unsafe {
        std::arch::asm!(
            "lea {pc}, [rip]",
            "mov {sp}, rsp",
            "mov {bp}, rbp",
            pc = out(reg) pc,
            sp = out(reg) sp,
            bp = out(reg) bp,
            options(nomem, nostack, preserves_flags)
        );
    }
    let (bottom, top) = (sp, top as u64);
    let mut read_stack = |addr: u64| {
        if addr >= bottom && addr.is_multiple_of(8) && addr.checked_add(8).is_some_and(|end| end <= top) {
            // SAFETY: [addr, addr + 8) lies within this thread's live stack (checked).
            Ok(unsafe { std::ptr::read_volatile(addr as *const u64) })
        } else {
            Err(())
        }
    };
    with_modules(|m| {
        let mut address = FrameAddress::from_instruction_pointer(pc);
        let mut regs = UnwindRegsX86_64::new(pc, sp, bp);
        let mut depth = 0;
        loop {
            let Some(slot) = frames.get_mut(depth) else {
                // Full: the rest of the stack is cut off, as with any unwinder.
                return Some(depth);
            };
            *slot = address.address() as usize;
            depth += 1;
            let way = m.way_for(address.address_for_lookup());
            match m
                .unwinder
                .unwind_frame(address, &mut regs, &mut m.caches[way], &mut read_stack)
            {
                Ok(Some(next)) => match FrameAddress::from_return_address(next) {
                    Some(next) => address = next,
                    None => return Some(depth),
                },
                Ok(None) => return Some(depth),
                Err(_) => {
                    if loader_generation().is_some_and(|g| g != m.generation) {
                        // Libraries came or went: read the list again for the next unwind.
                        *m = Modules::read()?;
                    }
                    return None;
                }
            }
        }
    })
}

/// Runs `f` on the module list under the lock, reading the list first if it was not yet.
fn with_modules<R>(f: impl FnOnce(&mut Modules) -> Option<R>) -> Option<R> {
    while SHARED
        .lock
        .compare_exchange_weak(false, true, Acquire, Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
    // SAFETY: the lock is held.
    let slot = unsafe { &mut *SHARED.modules.get() };
    if slot.is_none() {
        *slot = Modules::read().map(Box::new);
    }
    let result = slot.as_deref_mut().and_then(f);
    SHARED.lock.store(false, Release);
    result
}

impl Modules {
    /// Reads the loaded modules' unwind tables; `None` if the loader reported none.
    fn read() -> Option<Modules> {
        let mut found = Found::default();
        // SAFETY: the callback only reads the `dl_phdr_info` it is given, within `size`.
        unsafe { libc::dl_iterate_phdr(Some(each_module), std::ptr::from_mut(&mut found).cast()) };
        if found.modules.is_empty() {
            return None;
        }
        let mut unwinder = UnwinderX86_64::new();
        for module in found.modules {
            unwinder.add_module(module);
        }
        Some(Modules {
            unwinder,
            caches: std::array::from_fn(|_| CacheX86_64::new()),
            held: Box::new([[0; WAYS]; SLOTS]),
            next: Box::new([0; SLOTS]),
            generation: found.generation,
        })
    }

    /// The cache to unwind the frame at `lookup` with: the one holding its rule, else the
    /// slot's next in turn (which the unwind then fills with it).
    fn way_for(&mut self, lookup: u64) -> usize {
        let slot = (lookup % SLOTS as u64) as usize;
        let held = &mut self.held[slot];
        held.iter().position(|&a| a == lookup).unwrap_or_else(|| {
            let way = usize::from(self.next[slot]) % WAYS;
            self.next[slot] = ((way + 1) % WAYS) as u8;
            held[way] = lookup;
            way
        })
    }
}

#[derive(Default)]
struct Found {
    modules: Vec<Module<&'static [u8]>>,
    generation: u64,
}

/// `dl_iterate_phdr`'s callback: one module's executable range and unwind sections.
unsafe extern "C" fn each_module(info: *mut libc::dl_phdr_info, size: usize, data: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `data` is the `Found` passed to `dl_iterate_phdr`; `info` is valid for the
    // call, and its fields up to `size` are filled in.
    let (found, info) = unsafe { (&mut *data.cast::<Found>(), &*info) };
    if size >= std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8 {
        found.generation = info.dlpi_adds.wrapping_add(info.dlpi_subs);
    }
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: the loader's program headers of this module, `dlpi_phnum` of them.
    let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    if let Some(module) = module(info.dlpi_addr, headers) {
        found.modules.push(module);
    }
    0
}

/// The module loaded at `bias` with these program headers, if it has code and an
/// `.eh_frame_hdr` whose `.eh_frame` lies in one of its loaded segments.
fn module(bias: u64, headers: &[libc::Elf64_Phdr]) -> Option<Module<&'static [u8]>> {
    let code = headers
        .iter()
        .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_X != 0)
        .map(|h| h.p_vaddr..h.p_vaddr + h.p_memsz)
        .reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))?;
    let hdr = headers.iter().find(|h| h.p_type == libc::PT_GNU_EH_FRAME)?;
    let hdr_range = hdr.p_vaddr..hdr.p_vaddr + hdr.p_memsz;
    // SAFETY: the segment is mapped (the loader's headers of a loaded module).
    let hdr_data: &'static [u8] =
        unsafe { std::slice::from_raw_parts((bias + hdr.p_vaddr) as *const u8, hdr.p_memsz as usize) };
    let eh_frame_start = eh_frame_address(hdr_data, hdr.p_vaddr)?;
    // `.eh_frame`'s length is not in the header: up to the end of its segment.
    let segment = headers
        .iter()
        .find(|h| h.p_type == libc::PT_LOAD && (h.p_vaddr..h.p_vaddr + h.p_filesz).contains(&eh_frame_start))?;
    let eh_frame_range = eh_frame_start..segment.p_vaddr + segment.p_filesz;
    // SAFETY: within a loaded segment's file-backed part (checked above).
    let eh_frame: &'static [u8] = unsafe {
        std::slice::from_raw_parts(
            (bias + eh_frame_start) as *const u8,
            (eh_frame_range.end - eh_frame_range.start) as usize,
        )
    };
    let sections = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: Some(code.clone()),
        eh_frame_svma: Some(eh_frame_range),
        eh_frame: Some(eh_frame),
        eh_frame_hdr_svma: Some(hdr_range),
        eh_frame_hdr: Some(hdr_data),
        ..Default::default()
    };
    Some(Module::new(
        String::new(),
        bias + code.start..bias + code.end,
        bias,
        sections,
    ))
}

/// The address of `.eh_frame` from an `.eh_frame_hdr` at `hdr_address` (both relative to
/// the module's load address): its `eh_frame_ptr` field, in the encodings linkers write.
fn eh_frame_address(hdr: &[u8], hdr_address: u64) -> Option<u64> {
    const PCREL_SDATA4: u8 = 0x1b;
    const SDATA4: u8 = 0x0b;
    const UDATA4: u8 = 0x03;
    const ABSPTR: u8 = 0x00;
    const UDATA8: u8 = 0x04;
    let (&version, &encoding) = (hdr.first()?, hdr.get(1)?);
    if version != 1 {
        return None;
    }
    let field = hdr.get(4..)?;
    let word4 = || Some(i32::from_le_bytes(field.get(..4)?.try_into().ok()?));
    match encoding {
        PCREL_SDATA4 => (hdr_address + 4).checked_add_signed(i64::from(word4()?)),
        SDATA4 => u64::try_from(word4()?).ok(),
        UDATA4 => Some(u64::from(word4()? as u32)),
        ABSPTR | UDATA8 => Some(u64::from_le_bytes(field.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

/// The loader's count of loads and unloads, read from `dl_iterate_phdr`'s first module.
fn loader_generation() -> Option<u64> {
    unsafe extern "C" fn first(info: *mut libc::dl_phdr_info, size: usize, data: *mut libc::c_void) -> libc::c_int {
        if size >= std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8 {
            // SAFETY: as in `each_module`.
            unsafe {
                let info = &*info;
                *data.cast::<Option<u64>>() = Some(info.dlpi_adds.wrapping_add(info.dlpi_subs));
            }
        }
        1
    }
    let mut generation: Option<u64> = None;
    // SAFETY: the callback writes only the `Option<u64>` it is given.
    unsafe { libc::dl_iterate_phdr(Some(first), std::ptr::from_mut(&mut generation).cast()) };
    generation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eh_frame_pointer_is_decoded_in_each_encoding() {
        // version 1, pcrel|sdata4, then -0x40: 0x1000 + 4 - 0x40.
        let hdr = [1, 0x1b, 0x03, 0x3b, 0xc0, 0xff, 0xff, 0xff];
        assert_eq!(eh_frame_address(&hdr, 0x1000), Some(0x1000 + 4 - 0x40));
        let hdr = [1, 0x03, 0x03, 0x3b, 0x00, 0x20, 0x00, 0x00];
        assert_eq!(eh_frame_address(&hdr, 0x1000), Some(0x2000));
        let hdr = [1, 0x00, 0x03, 0x3b, 0x00, 0x30, 0, 0, 0, 0, 0, 0];
        assert_eq!(eh_frame_address(&hdr, 0x1000), Some(0x3000));
        // Another version, an unknown encoding, a short header.
        assert_eq!(eh_frame_address(&[2, 0x1b, 0, 0, 0, 0, 0, 0], 0), None);
        assert_eq!(eh_frame_address(&[1, 0x55, 0, 0, 0, 0, 0, 0], 0), None);
        assert_eq!(eh_frame_address(&[1, 0x1b, 0, 0, 0], 0), None);
    }

    #[test]
    fn addresses_that_share_a_slot_are_kept_in_different_caches() {
        let mut m = Modules::read().expect("this process's modules");
        let way = |m: &mut Modules, a: u64| m.way_for(a);
        let colliding: Vec<u64> = (0..WAYS as u64).map(|k| 0x1000 + k * SLOTS as u64).collect();
        let ways: Vec<usize> = colliding.iter().map(|&a| way(&mut m, a)).collect();
        let mut distinct = ways.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), WAYS);
        // Each keeps its cache while no more than WAYS addresses share the slot.
        for _ in 0..3 {
            for (&a, &w) in colliding.iter().zip(&ways) {
                assert_eq!(way(&mut m, a), w);
            }
        }
        // One more replaces the one whose turn it is, and only that one.
        let extra = way(&mut m, 0x1000 + WAYS as u64 * SLOTS as u64);
        assert_eq!(extra, ways[0]);
        assert_eq!(way(&mut m, colliding[1]), ways[1]);
    }

    #[inline(never)]
    fn unwound_and_traced() -> (Vec<usize>, Vec<usize>) {
        let top = {
            // SAFETY: as in `unwind::read_stack_top`.
            unsafe {
                let mut attr: libc::pthread_attr_t = std::mem::zeroed();
                assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
                let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
                assert_eq!(libc::pthread_attr_getstack(&attr, &mut addr, &mut size), 0);
                libc::pthread_attr_destroy(&mut attr);
                addr as usize + size
            }
        };
        let mut frames = [0usize; 64];
        let depth = unwind(top, &mut frames).expect("an unwind to the stack's end");
        let mut traced = Vec::new();
        backtrace::trace(|frame| {
            traced.push(frame.ip() as usize);
            true
        });
        (frames[..depth].to_vec(), traced)
    }

    #[test]
    fn an_unwind_finds_the_callers_that_libgcc_finds() {
        // On a thread of its own, so the whole stack is Rust's and libc's.
        let (unwound, traced) = std::thread::spawn(unwound_and_traced).join().unwrap();
        // Both start inside their own machinery, and leave the test function from two
        // calls: from its caller's frame on (the third frame of the unwind), they must be
        // the same stack.
        let a = unwound.get(2..).unwrap_or_default();
        let at = traced
            .iter()
            .position(|x| Some(x) == a.first())
            .expect("the caller in libgcc's stack");
        let b = &traced[at..];
        assert!(a.len() >= 3, "{a:x?}");
        assert_eq!(a, &b[..a.len()], "framehop {a:x?}\nlibgcc {b:x?}");
        // libgcc may find at most the outermost start-up frames beyond framehop's end.
        assert!(b.len() <= a.len() + 3, "framehop {a:x?}\nlibgcc {b:x?}");
    }
}
