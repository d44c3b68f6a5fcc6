//! SplitMix64: a seeded generator for the allocator tests, the same choices on every run with
//! the same seed (no crate needed).
#![allow(dead_code)]

pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// One stream per thread or task (`id`), derived from the seed.
    pub fn stream(seed: u64, id: u64) -> Rng {
        let mut rng = Rng(seed ^ id.wrapping_mul(0xd1b5_4a32_d192_ed03));
        rng.next();
        rng
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A size from `2^low` to `2^(low + span)` bytes, log-uniform: as many small sizes as
    /// large ones.
    pub fn log_size(&mut self, low: usize, span: usize) -> usize {
        let bits = low + self.below(span);
        (1usize << bits) + self.below(1 << bits)
    }
}
