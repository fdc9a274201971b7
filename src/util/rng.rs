//! The crate's deterministic generators: SplitMix64 (counter form) and FNV-1a. The synthetic
//! weights and images of `docs/SYNTHETIC.md` and the evaluation's prompt pick are defined by
//! them, so they must not change.

pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

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
}

pub fn mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}
