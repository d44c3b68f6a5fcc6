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
//! Before any of that, a stack from a call path unwound before is recalled from
//! `unwind_memo` by re-reading the stack words its unwind read, which costs a few dozen
//! reads of the thread's own (hot) stack instead of a walk through the caches.
//!
//! The module list is read with `dl_iterate_phdr` at the first unwind, and again when an
//! unwind fails and the loader counts loads or unloads since (`dlpi_adds`, `dlpi_subs`).
//! All of this runs with the thread's sampling held off (the sampler's `busy` flag), so
//! what it allocates (the list, the caches, and on a cache miss gimli's evaluation state)
//! is served unsampled. Its stack reads stay within the thread's live stack (from the
//! unwind's own stack pointer to the thread's stack top), so a garbled frame can only end
//! the unwind early: the caller then unwinds that stack with `backtrace`.
//!
//! One unwinder, set of caches and memo (about 110 KiB) serve every thread, behind a spin lock
//! held for one unwind (a microsecond or two); a `fork` child never samples, so never
//! takes it.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, FrameAddress, MayAllocateDuringUnwind, Module, Unwinder};

use super::sampler::DEPTH;
use super::unwind_memo::{Memo, Recording, NO_FRAME_POINTER};

type Policy = MayAllocateDuringUnwind;

/// framehop's cache slots (its `CACHE_ENTRY_COUNT`; another count only costs hit rate).
const SLOTS: usize = 509;
/// framehop caches used as one set-associative cache.
const WAYS: usize = 4;

/// The unwinder over the loaded modules, its rule caches, and the stacks it unwound.
struct Modules {
    unwinder: UnwinderX86_64<&'static [u8], Policy>,
    ways: Ways,
    memo: Memo,
    /// The loader's loads + unloads when the list was read.
    generation: u64,
}

/// framehop's rule caches as one set-associative cache.
struct Ways {
    caches: [CacheX86_64<Policy>; WAYS],
    /// For each slot, the lookup address each cache holds there (0: none).
    held: Box<[[u64; WAYS]; SLOTS]>,
    /// For each slot, the cache whose address is replaced next.
    next: Box<[u8; SLOTS]>,
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
    let read_stack = |addr: u64| {
        if addr >= bottom && addr.is_multiple_of(8) && addr.checked_add(8).is_some_and(|end| end <= top) {
            // SAFETY: [addr, addr + 8) lies within this thread's live stack (checked).
            Ok(unsafe { std::ptr::read_volatile(addr as *const u64) })
        } else {
            Err(())
        }
    };
    with_modules(|m| {
        // SAFETY: the memo reads only 8-byte words within [bottom, top), this thread's
        // live stack.
        let read_within = |addr: u64| unsafe { std::ptr::read_volatile(addr as *const u64) };
        if let Some(depth) = m.memo.recall(sp, bp, frames, (bottom, top), read_within) {
            #[cfg(test)]
            tests::RECALLS.fetch_add(1, Relaxed);
            return Some(depth);
        }
        // Without the frame-pointer register first: a stack that unwinds so is
        // remembered for any value of it.
        let unwound = m
            .unwind_remembered(pc, sp, NO_FRAME_POINTER, frames, read_stack)
            .or_else(|()| m.unwind_remembered(pc, sp, bp, frames, read_stack));
        match unwound {
            Ok(depth) => Some(depth),
            Err(()) => {
                if loader_generation().is_some_and(|g| g != m.generation) {
                    // Libraries came or went: read the list again for the next unwind.
                    *m = Modules::read()?;
                }
                None
            }
        }
    })
}

/// The stack reads of an unwind: from the stack, or replayed.
trait StackReads {
    fn read(&mut self, addr: u64) -> Result<u64, ()>;
    /// The last read was a frame's return address.
    fn returned(&mut self);
}

/// Reads the stack and logs each read for the memo.
struct Logged<'m, F> {
    read_stack: F,
    recording: Recording<'m>,
}

impl<F: Fn(u64) -> Result<u64, ()>> StackReads for Logged<'_, F> {
    fn read(&mut self, addr: u64) -> Result<u64, ()> {
        let value = (self.read_stack)(addr)?;
        self.recording.read(addr, value);
        Ok(value)
    }

    fn returned(&mut self) {
        self.recording.returned();
    }
}

/// Replays a logged unwind's reads, those not in `kept` (bit i: read i) replaced by
/// [`NO_FRAME_POINTER`]; fails at a read the log does not hold next.
struct Replay<'l> {
    log: &'l [(u64, u64)],
    kept: u128,
    at: usize,
}

impl StackReads for Replay<'_> {
    fn read(&mut self, addr: u64) -> Result<u64, ()> {
        let &(logged, value) = self.log.get(self.at).ok_or(())?;
        if logged != addr {
            return Err(());
        }
        let kept = self.kept >> self.at & 1 == 1;
        self.at += 1;
        Ok(if kept { value } else { NO_FRAME_POINTER })
    }

    fn returned(&mut self) {}
}

/// The logged reads (bit i: read i) whose value a later read used as its address: frame
/// pointers restored and then followed (framehop reads `*bp` first when it unwinds by one).
fn frame_pointers_used(log: &[(u64, u64)]) -> u128 {
    let mut used = 0u128;
    for (i, &(_, value)) in log.iter().enumerate() {
        if log[i + 1..].iter().any(|&(addr, _)| addr == value) {
            used |= 1 << i;
        }
    }
    used
}

/// Unwinds from `pc` with `regs` into `frames`: how many, and whether they ran out before
/// the stack's end; `Err` if the unwind failed before either.
fn frames_from(
    unwinder: &UnwinderX86_64<&'static [u8], Policy>,
    ways: &mut Ways,
    pc: u64,
    mut regs: UnwindRegsX86_64,
    frames: &mut [usize],
    reads: &mut impl StackReads,
) -> Result<(usize, bool), ()> {
    let mut address = FrameAddress::from_instruction_pointer(pc);
    let mut depth = 0;
    loop {
        let Some(slot) = frames.get_mut(depth) else {
            // Full: the rest of the stack is cut off, as with any unwinder.
            return Ok((depth, true));
        };
        *slot = address.address() as usize;
        depth += 1;
        let cache = ways.cache_for(address.address_for_lookup());
        match unwinder.unwind_frame(address, &mut regs, cache, &mut |a| reads.read(a)) {
            Ok(Some(next)) => {
                reads.returned();
                match FrameAddress::from_return_address(next) {
                    Some(next) => address = next,
                    None => return Ok((depth, false)),
                }
            }
            Ok(None) => return Ok((depth, false)),
            Err(_) => return Err(()),
        }
    }
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
            ways: Ways {
                caches: std::array::from_fn(|_| CacheX86_64::new()),
                held: Box::new([[0; WAYS]; SLOTS]),
                next: Box::new([0; SLOTS]),
            },
            memo: Memo::new(),
            generation: found.generation,
        })
    }
}

impl Modules {
    /// Unwinds from `pc`, `sp` and `bp` into `frames`, remembering the stack and the reads
    /// that found it; how many frames.
    ///
    /// Code without frame pointers saves and restores registers (the frame-pointer
    /// register among them) that the unwind reads but, in the end, does not use; their
    /// values differ from sample to sample. A restored frame pointer that an outer frame
    /// does use shows as a later read at its value ([`frame_pointers_used`]). So the unwind
    /// is replayed with every other restored register replaced by [`NO_FRAME_POINTER`]: if
    /// it still finds the same stack, that stack depends only on the return addresses and
    /// the frame pointers used, and only those reads are compared when it is recalled.
    fn unwind_remembered(
        &mut self,
        pc: u64,
        sp: u64,
        bp: u64,
        frames: &mut [usize],
        read_stack: impl Fn(u64) -> Result<u64, ()>,
    ) -> Result<usize, ()> {
        let regs = UnwindRegsX86_64::new(pc, sp, bp);
        let mut logged = Logged {
            read_stack,
            recording: self.memo.record(),
        };
        let (depth, cut) = frames_from(&self.unwinder, &mut self.ways, pc, regs, frames, &mut logged)?;
        let recording = logged.recording;
        let mut again = [0usize; DEPTH];
        let again = &mut again[..frames.len().min(DEPTH)];
        let (log, returns) = recording.log();
        let compared = returns | frame_pointers_used(log);
        let mut replay = Replay {
            log,
            kept: compared,
            at: 0,
        };
        let replayed = frames_from(&self.unwinder, &mut self.ways, pc, regs, again, &mut replay);
        let independent = replayed == Ok((depth, cut)) && again[..depth] == frames[..depth] && replay.at == log.len();
        recording.keep(
            sp,
            bp,
            &frames[..depth],
            cut,
            if independent { compared } else { u128::MAX },
        );
        Ok(depth)
    }
}

impl Ways {
    /// The cache to unwind the frame at `lookup` with: the one holding its rule, else the
    /// slot's next in turn (which the unwind then fills with it).
    fn cache_for(&mut self, lookup: u64) -> &mut CacheX86_64<Policy> {
        let way = self.way_for(lookup);
        &mut self.caches[way]
    }

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
    if let Some(generation) = generation(info, size) {
        found.generation = generation;
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

/// The loader's loads + unloads from a `dl_phdr_info` of `size` bytes, if it has them.
fn generation(info: &libc::dl_phdr_info, size: usize) -> Option<u64> {
    (size >= std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8)
        .then(|| info.dlpi_adds.wrapping_add(info.dlpi_subs))
}

/// The loader's count of loads and unloads, read from `dl_iterate_phdr`'s first module.
fn loader_generation() -> Option<u64> {
    unsafe extern "C" fn first(info: *mut libc::dl_phdr_info, size: usize, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: as in `each_module`; `data` is the `Option<u64>` below.
        unsafe { *data.cast::<Option<u64>>() = generation(&*info, size) };
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
    use std::sync::atomic::AtomicU64;

    /// Stacks recalled from the memo instead of unwound.
    pub(super) static RECALLS: AtomicU64 = AtomicU64::new(0);

    fn stack_top() -> usize {
        super::super::unwind::read_stack_top().expect("this thread's stack")
    }

    #[inline(never)]
    fn from_a(top: usize) -> Vec<usize> {
        let mut frames = [0usize; 64];
        let depth = std::hint::black_box(unwind(top, &mut frames)).expect("an unwind");
        frames[..depth].to_vec()
    }

    #[inline(never)]
    fn from_b(top: usize) -> Vec<usize> {
        let mut frames = [0usize; 64];
        let depth = std::hint::black_box(unwind(top, &mut frames)).expect("an unwind");
        frames[..depth].to_vec()
    }

    #[test]
    fn a_recalled_stack_is_the_one_unwound_and_another_path_is_not_recalled_for_it() {
        std::thread::spawn(|| {
            let top = stack_top();
            let recalls = RECALLS.load(Relaxed);
            let mut first = None;
            for _ in 0..4 {
                let (a, b) = (from_a(top), from_b(top));
                let (a0, b0) = first.get_or_insert_with(|| (a.clone(), b.clone()));
                // The same call path gives the same stack each time.
                assert_eq!(&a, a0);
                assert_eq!(&b, b0);
                // Two paths, likely from the same stack pointer: they differ in the
                // function that unwound and in the closure's call site, not beyond.
                assert_ne!(a[1], b[1]);
                assert_ne!(a[2], b[2]);
                assert_eq!(a[3..], b[3..]);
            }
            assert!(
                RECALLS.load(Relaxed) >= recalls + 6,
                "the stacks were unwound again, not recalled"
            );
        })
        .join()
        .unwrap();
    }

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
    fn a_restored_frame_pointer_counts_as_used_when_a_later_read_follows_it() {
        // Read 0 restores 0x2000, which read 3 follows; read 1's 0x9999 is never followed.
        let log = [
            (0x1000, 0x2000),
            (0x1008, 0x9999),
            (0x1010, 0x5555),
            (0x2000, 0x3000),
            (0x2008, 0x4444),
        ];
        assert_eq!(frame_pointers_used(&log), 0b1);
        assert_eq!(frame_pointers_used(&[]), 0);
    }

    #[test]
    fn addresses_that_share_a_slot_are_kept_in_different_caches() {
        let mut m = Modules::read().expect("this process's modules").ways;
        let way = |m: &mut Ways, a: u64| m.way_for(a);
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
        let top = stack_top();
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
