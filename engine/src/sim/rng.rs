//! The simulation's own randomness and trace digest: a few lines each, identical on every
//! platform and every Rust release (no external crate, nothing keyed by addresses or by time).

/// splitmix64: one `u64` of state, well mixed, and trivially reproducible from a seed.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// An independent stream for one purpose (network, faults, one peer's compute times), so
    /// that drawing more numbers in one place does not shift every other draw.
    pub(crate) fn fork(&mut self, purpose: u64) -> Rng {
        Rng(self.next_u64() ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (the modulo bias is far below what these small ranges could show).
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }

    /// An index in `0..n`.
    pub(crate) fn index(&mut self, n: usize) -> usize {
        self.range(0, n as u64) as usize
    }

    /// True with probability `num / den`.
    pub(crate) fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }
}

/// FNV-1a, 64 bits: folds every processed event, in order, into one number that names a trace.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Digest(u64);

impl Digest {
    pub(crate) fn new() -> Self {
        Digest(0xCBF2_9CE4_8422_2325)
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    pub(crate) fn u64(&mut self, x: u64) {
        self.bytes(&x.to_le_bytes());
    }

    pub(crate) fn value(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_stream_and_forks_differ() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let (mut f, mut g) = (a.fork(1), a.fork(2));
        assert_ne!(f.next_u64(), g.next_u64());
        for _ in 0..1000 {
            let x = a.range(3, 9);
            assert!((3..9).contains(&x));
        }
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        let mut d = Digest::new();
        d.bytes(b"");
        assert_eq!(d.value(), 0xCBF2_9CE4_8422_2325);
        d.bytes(b"a");
        assert_eq!(d.value(), 0xAF63_DC4C_8601_EC8C);
    }
}
