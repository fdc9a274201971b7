//! How the GEMM-shaped kernels (the direct conv and both Winograd schedules) cut their work:
//! output channels into register-tile-wide column groups, the reduction into chunks whose
//! packed weights stay in L1, work units run on the pool or, when small, on the caller, and
//! the shared output pointer those units write through.

use rayon::prelude::*;

use super::gemm::next_tile_width;
use super::simd::LANES;

/// Target length of one reduction block: 256 x 48 packed weights = 48 KiB.
pub(crate) const KC_TARGET: usize = 256;
/// Work (multiply-adds) below which a convolution runs on the calling thread.
pub(crate) const SERIAL_MACS: usize = 1 << 20;

/// Output channels `co0..co0 + 16 * nv` of packed weights, stored from `offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ColumnGroup {
    /// First output channel.
    pub(crate) co0: usize,
    /// Width in vectors of 16 channels.
    pub(crate) nv: usize,
    /// Start of this group's weights in the packed data.
    pub(crate) offset: usize,
}

/// Split `n16` vectors of output channels into tile-wide groups (see [`next_tile_width`]).
pub(crate) fn group_widths(n16: usize) -> Vec<usize> {
    let mut widths = Vec::new();
    let mut remaining = n16;
    while remaining > 0 {
        let nv = next_tile_width(remaining);
        widths.push(nv);
        remaining -= nv;
    }
    widths
}

/// The column groups of `cout` output channels whose packed weights hold `rows` floats per
/// output channel (lane), one group after the other; and the total packed length.
pub(crate) fn column_groups(cout: usize, rows: usize) -> (Vec<ColumnGroup>, usize) {
    let mut groups = Vec::new();
    let (mut co0, mut offset) = (0, 0);
    for nv in group_widths(cout.div_ceil(LANES)) {
        groups.push(ColumnGroup { co0, nv, offset });
        co0 += nv * LANES;
        offset += rows * nv * LANES;
    }
    (groups, offset)
}

/// Output channels of `groups` padded to whole vectors.
pub(crate) fn padded_width(groups: &[ColumnGroup]) -> usize {
    groups.iter().map(|gr| gr.nv * LANES).sum()
}

/// Output pointer shared by the units; each unit writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: units write disjoint (pixel, channel) ranges: each kernel's plan says which.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Runs `f` on every unit, on the rayon pool when `parallel`.
pub(crate) fn for_each_unit<T: Sync>(parallel: bool, units: &[T], f: impl Fn(&T) + Send + Sync) {
    if parallel {
        units.par_iter().for_each(f);
    } else {
        units.iter().for_each(f);
    }
}
