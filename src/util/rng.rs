//! The crate's one pseudo-random generator: SplitMix64 (Vigna's splitmix64.c), in counter
//! form so that any draw of a stream can be read directly. The synthetic weights and images
//! of `docs/SYNTHETIC.md` are defined on it, so its outputs must never change; tests and
//! benchmarks draw their data from it too.

/// The stream's increment (the golden ratio in 64 bits).
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 in counter form: the i-th draw (i = 1, 2, ...) is `mix(state0 + i * GAMMA)`.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state0: u64,
    /// Draws made so far.
    drawn: u64,
}

impl SplitMix64 {
    pub fn new(state0: u64) -> Self {
        SplitMix64 { state0, drawn: 0 }
    }

    /// The i-th draw of the stream (i from 1), without advancing it.
    pub fn draw_at(&self, i: u64) -> u64 {
        mix(self.state0.wrapping_add(i.wrapping_mul(GAMMA)))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.drawn += 1;
        self.draw_at(self.drawn)
    }

    /// Uniform in [-1, 1) from the draw's top 24 bits (exact in f32).
    pub fn next_signed_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `len` draws of `next_signed_f32`.
    pub fn signed_f32s(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next_signed_f32()).collect()
    }

    /// In [0, n) by modulo: biased by at most n / 2^64, nothing for tests' small n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// SplitMix64's output function.
pub fn mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Standard SplitMix64 seeded with 0 (Vigna's splitmix64.c): its outputs.
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xe220a8397b1dcdaf);
        assert_eq!(g.next_u64(), 0x6e789e6aa1b965f4);
        assert_eq!(g.next_u64(), 0x06c45d188009454f);
        // Counter form: random access agrees with sequential draws.
        let h = SplitMix64::new(0);
        assert_eq!(h.draw_at(3), 0x06c45d188009454f);
        let mut s = SplitMix64::new(u64::MAX);
        let seq: Vec<u64> = (0..5).map(|_| s.next_u64()).collect();
        let direct: Vec<u64> = (1..=5)
            .map(|i| SplitMix64::new(u64::MAX).draw_at(i))
            .collect();
        assert_eq!(seq, direct);
    }

    #[test]
    fn signed_floats_and_below_stay_in_range() {
        let mut g = SplitMix64::new(3);
        assert!(g.signed_f32s(1000).iter().all(|v| (-1.0..1.0).contains(v)));
        assert!((0..1000).all(|_| g.below(7) < 7));
    }
}
