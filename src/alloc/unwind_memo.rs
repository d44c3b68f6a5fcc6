//! Unwound stacks remembered by what their unwind read, so that a sample from a call path
//! seen before costs a few dozen stack reads instead of an unwind.
//!
//! An unwind is a function of the registers it starts from and the stack words it reads:
//! the rules come from the modules (fixed while the module list is), and each read's
//! address follows from the registers and the values read before it. So an unwind that
//! starts from the same registers, and finds the same value at every address the
//! remembered one read, reads the same addresses in the same order and yields the same
//! stack. The instruction pointer is always the same (inside `eh_frame::unwind`); the
//! stack pointer is compared. The frame-pointer register is compared only when the unwind
//! used it: in code built without frame pointers it holds whatever the code keeps there,
//! different at every sample. So an unwind is first tried with that register set to
//! [`NO_FRAME_POINTER`], which every rule that would use it fails on (it reads nowhere in
//! the stack): a stack that unwinds from there does not depend on the register, and is
//! recalled whatever it holds. Otherwise (the innermost frames keep frame pointers) the
//! unwind is made from the register's value, and the stack recalled only for that value,
//! the frame's own.
//!
//! [`ENTRIES`] stacks are kept, any number of them for one stack pointer (call paths of
//! the same depth share it), the one recalled least recently replaced. They were kept two
//! per set by stack pointer before: which call paths shared a set then depended on where the
//! process's stack lay, and a loop allocating from a few paths cost 1.01–1.10× in different
//! processes, as paths in one set replaced each other at every sample.

use super::sampler::DEPTH;

/// The frame-pointer register's value for an unwind whose stack may be remembered: odd,
/// and below every stack, so a rule that uses it reads outside the stack and fails.
pub(crate) const NO_FRAME_POINTER: u64 = 1;

/// Stacks remembered.
const ENTRIES: usize = 16;
/// Stack reads an unwind may make and still be remembered (framehop reads at most two
/// words per frame on x86_64: the return address and a saved frame pointer).
const READS: usize = 2 * DEPTH;

/// One remembered stack (its stack pointer is in [`Memo::sps`]).
struct Entry {
    /// The frame-pointer register its unwind started from ([`NO_FRAME_POINTER`]: any).
    bp: u64,
    depth: u16,
    reads: u16,
    /// Whether the unwind stopped at the capacity it was given rather than the stack's end.
    cut: bool,
    /// The lowest address its compared reads read, and the end of the highest word: a
    /// recall checks that they lie in the stack once, not at each read.
    lo: u64,
    hi: u64,
    log: [(u64, u64); READS],
    frames: [usize; DEPTH],
}

/// The remembered stacks (about 42 KiB).
pub(crate) struct Memo {
    entries: Vec<Entry>,
    /// Each entry's stack pointer, the one its unwind started from (0: none), side by side
    /// so that a recall finds the
    /// candidates in two cache lines.
    sps: [u64; ENTRIES],
    /// When each entry was last recalled or recorded, by `clock`.
    used: [u32; ENTRIES],
    clock: u32,
}

impl Memo {
    pub(crate) fn new() -> Self {
        Self {
            entries: (0..ENTRIES)
                .map(|_| Entry {
                    bp: NO_FRAME_POINTER,
                    depth: 0,
                    reads: 0,
                    cut: false,
                    lo: 0,
                    hi: 0,
                    log: [(0, 0); READS],
                    frames: [0; DEPTH],
                })
                .collect(),
            sps: [0; ENTRIES],
            used: [0; ENTRIES],
            clock: 0,
        }
    }

    /// Marks entry `i` as just used.
    fn touch(&mut self, i: usize) {
        self.clock = self.clock.wrapping_add(1);
        self.used[i] = self.clock;
    }

    /// Copies into `frames` the stack remembered for an unwind from `sp` and `bp` whose
    /// every read still reads the same through `read`; how many frames, or `None`. `read`
    /// is called only for addresses of 8-byte words within `stack` (start, end): checked
    /// once per entry, so that comparing a read is a load and a compare.
    pub(crate) fn recall(
        &mut self,
        sp: u64,
        bp: u64,
        frames: &mut [usize],
        stack: (u64, u64),
        mut read: impl FnMut(u64) -> u64,
    ) -> Option<usize> {
        for i in 0..ENTRIES {
            if self.sps[i] != sp {
                continue;
            }
            let e = &self.entries[i];
            let depth = usize::from(e.depth);
            let bp_matches = e.bp == NO_FRAME_POINTER || e.bp == bp;
            if !bp_matches || depth > frames.len() || (e.cut && depth < frames.len()) {
                continue;
            }
            let log = &e.log[..usize::from(e.reads)];
            let within = log.is_empty() || (e.lo >= stack.0 && e.hi <= stack.1);
            if within && log.iter().all(|&(addr, value)| read(addr) == value) {
                frames[..depth].copy_from_slice(&e.frames[..depth]);
                self.touch(i);
                return Some(depth);
            }
        }
        None
    }

    /// Starts remembering an unwind, in an empty entry or else the one used least
    /// recently (forgotten until [`Recording::keep`]).
    pub(crate) fn record(&mut self) -> Recording<'_> {
        let clock = self.clock;
        let i = (0..ENTRIES).find(|&i| self.sps[i] == 0).unwrap_or_else(|| {
            (0..ENTRIES)
                .max_by_key(|&i| clock.wrapping_sub(self.used[i]))
                .unwrap_or(0)
        });
        self.touch(i);
        self.sps[i] = 0;
        let entry = &mut self.entries[i];
        entry.reads = 0;
        Recording {
            entry,
            sp: &mut self.sps[i],
            full: false,
            returns: 0,
        }
    }
}

/// An unwind being remembered: its reads, then its stack.
pub(crate) struct Recording<'a> {
    entry: &'a mut Entry,
    /// The entry's place in [`Memo::sps`].
    sp: &'a mut u64,
    /// More reads than [`READS`]: not remembered.
    full: bool,
    /// Which reads were return addresses (bit i: read i).
    returns: u128,
}

const _: () = assert!(READS <= u128::BITS as usize);

impl Recording<'_> {
    /// The unwind read `value` at `addr`.
    pub(crate) fn read(&mut self, addr: u64, value: u64) {
        let n = usize::from(self.entry.reads);
        match self.entry.log.get_mut(n) {
            Some(slot) => {
                *slot = (addr, value);
                self.entry.reads += 1;
            }
            None => self.full = true,
        }
    }

    /// The last read was a frame's return address.
    pub(crate) fn returned(&mut self) {
        if let Some(last) = self.entry.reads.checked_sub(1) {
            if !self.full {
                self.returns |= 1 << last;
            }
        }
    }

    /// The reads so far, and which were return addresses.
    pub(crate) fn log(&self) -> (&[(u64, u64)], u128) {
        (&self.entry.log[..usize::from(self.entry.reads)], self.returns)
    }

    /// The unwind from `sp` and `bp` found `frames`; `cut` if it stopped at their capacity.
    /// Only the reads in `compared` (bit i: read i) are compared on recall: the caller
    /// showed that the others do not change the stack found.
    pub(crate) fn keep(self, sp: u64, bp: u64, frames: &[usize], cut: bool, compared: u128) {
        if self.full || frames.len() > DEPTH || sp == 0 {
            return;
        }
        let e = self.entry;
        let (mut kept, mut lo, mut hi) = (0, u64::MAX, 0);
        for i in 0..usize::from(e.reads) {
            if compared >> i & 1 == 1 {
                let (addr, _) = e.log[i];
                if !addr.is_multiple_of(8) || addr > u64::MAX - 8 {
                    return;
                }
                (lo, hi) = (lo.min(addr), hi.max(addr + 8));
                e.log[kept] = e.log[i];
                kept += 1;
            }
        }
        (e.reads, e.lo, e.hi) = (kept as u16, lo, hi);
        e.frames[..frames.len()].copy_from_slice(frames);
        e.depth = frames.len() as u16;
        e.cut = cut;
        e.bp = bp;
        *self.sp = sp;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack of words at addresses 0x1000 + 8i: its bounds, and a reader that fails
    /// the test when called outside them.
    fn stack(words: &[u64]) -> (u64, u64) {
        (0x1000, 0x1000 + 8 * words.len() as u64)
    }

    fn reader(words: &[u64]) -> impl FnMut(u64) -> u64 + '_ {
        move |addr| words[((addr - 0x1000) / 8) as usize]
    }

    /// Recalls from `memo` with the stack `words` (see [`stack`]).
    fn recall(memo: &mut Memo, sp: u64, bp: u64, frames: &mut [usize], words: &[u64]) -> Option<usize> {
        memo.recall(sp, bp, frames, stack(words), reader(words))
    }

    /// A memo that remembers the stack [7, 8, 9] from 0x1000, whose unwind read 20 at
    /// 0x1008 and 40 at 0x1018, for any frame-pointer register.
    fn memo_of_two_reads() -> Memo {
        let mut memo = Memo::new();
        let mut r = memo.record();
        r.read(0x1008, 20);
        r.read(0x1018, 40);
        r.keep(0x1000, NO_FRAME_POINTER, &[7, 8, 9], false, u128::MAX);
        memo
    }

    #[test]
    fn a_stack_is_recalled_only_while_its_reads_read_the_same() {
        let mut memo = memo_of_two_reads();
        let mut words = vec![10, 20, 30, 40];
        let mut frames = [0usize; DEPTH];
        assert_eq!(recall(&mut memo, 0x1000, 0x77, &mut frames, &words), Some(3));
        assert_eq!(frames[..3], [7, 8, 9]);
        // Another stack pointer, or a word it read changed: not recalled.
        assert_eq!(recall(&mut memo, 0x1010, 0x77, &mut frames, &words), None);
        words[3] = 41;
        assert_eq!(recall(&mut memo, 0x1000, 0x77, &mut frames, &words), None);
        // Any frame-pointer register, as the unwind did not use it; a word it did not
        // read may change.
        words[3] = 40;
        words[0] = 11;
        assert_eq!(recall(&mut memo, 0x1000, 0x77, &mut frames, &words), Some(3));
    }

    #[test]
    fn a_stack_whose_reads_lie_beyond_the_stack_is_not_recalled_and_not_read() {
        let mut memo = memo_of_two_reads();
        let mut frames = [0usize; DEPTH];
        // The stack now ends at 0x1010: the reader would panic beyond it.
        let words = [10, 20];
        assert_eq!(recall(&mut memo, 0x1000, 0, &mut frames, &words), None);
        // Starting above the lowest read: not recalled either.
        let words = [10, 20, 30, 40];
        let above = (0x1010, 0x1020);
        assert_eq!(memo.recall(0x1000, 0, &mut frames, above, reader(&words)), None);
        assert_eq!(recall(&mut memo, 0x1000, 0, &mut frames, &words), Some(3));
    }

    #[test]
    fn a_stack_kept_by_some_reads_ignores_the_others() {
        let mut memo = Memo::new();
        let mut words = vec![10, 20, 30, 40];
        let mut r = memo.record();
        // A saved register, then the return address; then a return address alone.
        r.read(0x1000, 10);
        r.read(0x1008, 20);
        r.returned();
        r.read(0x1018, 40);
        r.returned();
        assert_eq!(r.log(), (&[(0x1000, 10), (0x1008, 20), (0x1018, 40)][..], 0b110));
        r.keep(0x1000, NO_FRAME_POINTER, &[7, 20, 40], false, 0b110);
        let mut frames = [0usize; DEPTH];
        words[0] = 99;
        assert_eq!(recall(&mut memo, 0x1000, 0, &mut frames, &words), Some(3));
        words[1] = 21;
        assert_eq!(recall(&mut memo, 0x1000, 0, &mut frames, &words), None);
    }

    #[test]
    fn a_stack_that_used_the_frame_pointer_is_recalled_only_for_its_value() {
        let mut memo = Memo::new();
        let words = [0u64; 1];
        memo.record().keep(0x1000, 0x1040, &[5], false, u128::MAX);
        assert_eq!(recall(&mut memo, 0x1000, 0x1048, &mut [0; 8], &words), None);
        assert_eq!(recall(&mut memo, 0x1000, 0x1040, &mut [0; 8], &words), Some(1));
    }

    #[test]
    fn a_cut_stack_is_not_recalled_for_more_room_and_a_long_read_log_is_not_kept() {
        let mut memo = Memo::new();
        let words = [1u64; 4];
        memo.record().keep(0x1000, NO_FRAME_POINTER, &[1, 2], true, u128::MAX);
        assert_eq!(recall(&mut memo, 0x1000, 0, &mut [0; 2], &words), Some(2));
        assert_eq!(recall(&mut memo, 0x1000, 0, &mut [0; 8], &words), None);
        let mut r = memo.record();
        for i in 0..=READS as u64 {
            r.read(0x1000, i);
        }
        r.keep(0x2000, NO_FRAME_POINTER, &[1], false, u128::MAX);
        assert_eq!(recall(&mut memo, 0x2000, 0, &mut [0; 8], &words), None);
    }

    #[test]
    fn stacks_of_one_stack_pointer_are_told_apart_and_the_least_recently_used_is_replaced() {
        let mut memo = Memo::new();
        // Call paths of one depth: the same stack pointer, different return addresses.
        let mut words = vec![0u64; 1];
        let sp = 0x1000;
        for path in 0..ENTRIES as u64 {
            let mut r = memo.record();
            r.read(0x1000, 100 + path);
            r.keep(sp, NO_FRAME_POINTER, &[path as usize], false, u128::MAX);
        }
        let mut frames = [0usize; DEPTH];
        for path in 0..ENTRIES as u64 {
            words[0] = 100 + path;
            assert_eq!(recall(&mut memo, sp, 0, &mut frames, &words), Some(1), "path {path}");
            assert_eq!(frames[0], path as usize);
        }
        // Path 0 was recalled longest ago: a new path replaces it and only it.
        let mut r = memo.record();
        r.read(0x1000, 999);
        r.keep(sp, NO_FRAME_POINTER, &[999], false, u128::MAX);
        words[0] = 100;
        assert_eq!(recall(&mut memo, sp, 0, &mut frames, &words), None);
        for path in 1..ENTRIES as u64 {
            words[0] = 100 + path;
            assert_eq!(recall(&mut memo, sp, 0, &mut frames, &words), Some(1), "path {path}");
        }
        words[0] = 999;
        assert_eq!(recall(&mut memo, sp, 0, &mut frames, &words), Some(1));
        assert_eq!(frames[0], 999);
        // A stack pointer never seen: nothing.
        assert_eq!(recall(&mut memo, 0x2000, 0, &mut frames, &words), None);
    }
}
