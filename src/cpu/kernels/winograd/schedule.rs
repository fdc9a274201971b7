//! How a Winograd conv's work is organized: the two schedules, which one a shape gets, the
//! partition into work units, and the one GEMM step both run (a position's transformed
//! inputs times its transformed weights).

// Constant-bound index loops over tiles keep them in registers (see gemm.rs).
#![allow(clippy::needless_range_loop)]

use super::{PackedWinograd, POS, TILE};
use crate::cpu::kernels::gemm::{
    accumulate, accumulate_prefetching, add_from, prefetch_share, store_tile, zero_tile, Tile,
};
use crate::cpu::kernels::partition::{padded_width, KC_TARGET, SERIAL_MACS};
use crate::cpu::kernels::simd::{Level, LANES};
use crate::cpu::kernels::ConvGeometry;

/// Target size in floats of one unit's scratch (`V` chunk + `M`): 1 MiB, half an L2.
const SCRATCH_FLOATS: usize = 1 << 18;
/// Tile rows are reserved in multiples of every tile height in use (8, 6, 3, 2).
pub(super) const PIXEL_ALIGN: usize = 24;
/// Largest transformed input (`POS * tiles * cin` floats, 16 MB) the by-position schedule
/// holds at once; dec0.conv1 at model size 512 (64 tiles x 1216 channels) takes 12.6 MB.
const BY_POSITION_MAX_V_FLOATS: usize = 4 << 20;

/// How a Winograd convolution's work is organized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// Units of (tile block, column groups), each transforming its own inputs into a
    /// per-thread scratch that stays in L2; the transformed weights are read once per tile
    /// block. For many tiles (dec1..dec4).
    TileBlocked,
    /// Three phases over buffers shared by the threads: every input tile transformed once;
    /// one unit per (position, column group) multiplying all tiles by that weight matrix,
    /// so each is read once in total and stays hot while every tile uses it; the output
    /// transforms. For few tiles and many channels (dec0), where weights outweigh inputs:
    /// the tile-block schedule had tiny GEMMs streaming 45 MB of weights per tile block.
    ByPosition,
}

impl Schedule {
    /// By position when the weights outweigh the inputs (padded columns >= tiles) and the
    /// transformed input fits [`BY_POSITION_MAX_V_FLOATS`]; by tile blocks otherwise.
    pub(crate) fn for_shape(g: &ConvGeometry, w: &PackedWinograd) -> Schedule {
        let tiles = g.out_w.div_ceil(TILE) * g.out_h.div_ceil(TILE);
        let coutp = padded_width(&w.groups);
        let v_floats = POS * tiles.next_multiple_of(PIXEL_ALIGN) * g.cin.next_multiple_of(LANES);
        if tiles <= coutp && v_floats <= BY_POSITION_MAX_V_FLOATS {
            Schedule::ByPosition
        } else {
            Schedule::TileBlocked
        }
    }
}

/// Floats between two positions' blocks of `rows` rows of `width` floats (`width` a multiple
/// of 16): `rows * width`, plus one cache line when that would be an even number of lines.
/// An input or output transform touches all 36 positions of a tile at once; at an even
/// line stride (a multiple of 4 KiB for most tile counts) those 36 lines fall into a few L1
/// sets and evict each other, at an odd one into 36 different sets.
pub(super) fn position_stride(rows: usize, width: usize) -> usize {
    let floats = rows * width;
    if (floats / LANES).is_multiple_of(2) {
        floats + LANES
    } else {
        floats
    }
}

/// One work unit of the tile-block schedule: tiles `t0..t1` (raster order) for column
/// groups `g0..g1`, whose output channels are `col0..col0 + cols` (padded to whole vectors).
#[derive(Clone, Copy, Debug)]
pub(super) struct Unit {
    pub(super) t0: usize,
    pub(super) t1: usize,
    pub(super) g0: usize,
    pub(super) g1: usize,
    pub(super) col0: usize,
    pub(super) cols: usize,
}

pub(super) struct Plan {
    pub(super) tiles_w: usize,
    /// Input channel chunks `(c0, c1)`, each starting at a multiple of 16.
    pub(super) chunks: Vec<(usize, usize)>,
    /// Row stride of `V` (the longest chunk rounded up to 16).
    pub(super) kcs: usize,
    /// Rows (tiles) reserved per unit in `V` and `M`: a multiple of every tile height.
    pub(super) rows: usize,
    pub(super) units: Vec<Unit>,
    pub(super) parallel: bool,
}

/// Cut the work into units. Splitting tiles into blocks re-reads the transformed weights
/// per block; splitting column groups re-transforms the inputs per group: pick whichever
/// moves fewer floats, with enough units for the threads, each unit's scratch within
/// [`SCRATCH_FLOATS`] where possible.
pub(super) fn plan(g: &ConvGeometry, w: &PackedWinograd, threads: usize) -> Plan {
    let tiles_w = g.out_w.div_ceil(TILE);
    let tiles = tiles_w * g.out_h.div_ceil(TILE);
    let (chunks, kcs) = channel_chunks(g.cin);
    let coutp = padded_width(&w.groups);
    let macs = POS * tiles * g.cin * coutp;
    let parallel = threads > 1 && macs >= SERIAL_MACS;
    let wanted = if parallel { 4 * threads } else { 1 };
    let (blocks, split) = tile_blocks(g.cin, tiles, kcs, w, wanted);
    // Tile blocks in multiples of 8 rows (the AVX-512 tile height) when that costs nothing.
    let mut nt = tiles.div_ceil(blocks);
    if nt > 8 {
        nt = nt.next_multiple_of(8);
    }
    Plan {
        tiles_w,
        chunks,
        kcs,
        rows: nt.next_multiple_of(PIXEL_ALIGN),
        units: units(tiles, nt, split, w),
        parallel,
    }
}

/// Input channel chunks of about [`KC_TARGET`], each starting at a multiple of 16, and
/// their row stride (the longest rounded up to 16).
fn channel_chunks(cin: usize) -> (Vec<(usize, usize)>, usize) {
    let nchunks = cin.div_ceil(KC_TARGET);
    let kcs = cin.div_ceil(nchunks).next_multiple_of(LANES);
    let chunks = (0..cin)
        .step_by(kcs)
        .map(|c0| (c0, (c0 + kcs).min(cin)))
        .collect();
    (chunks, kcs)
}

/// How many tile blocks, and whether units also split by column group (see [`plan`]).
fn tile_blocks(
    cin: usize,
    tiles: usize,
    kcs: usize,
    w: &PackedWinograd,
    wanted: usize,
) -> (usize, bool) {
    let ngroups = w.groups.len();
    let coutp = padded_width(&w.groups);
    let weights = POS * cin * coutp;
    let inputs = POS * tiles * cin;
    // A unit split by column group holds one group's columns: the widest group's, which
    // depends on the ISA's tiles (3 vectors on AVX-512, 1 on AVX2).
    let widest = w.groups.iter().map(|g| g.nv).max().unwrap_or(1) * LANES;
    // (cost, tile blocks, split by column group)
    let option = |split: bool| {
        let (cols, splits) = if split { (widest, ngroups) } else { (coutp, 1) };
        let fit = (SCRATCH_FLOATS / (POS * (kcs + cols))).max(1);
        let blocks = tiles.div_ceil(fit).max(wanted.div_ceil(splits)).min(tiles);
        (blocks * weights + splits * inputs, blocks, split)
    };
    let whole = option(false);
    let (_, blocks, split) = if ngroups > 1 {
        let by_group = option(true);
        if by_group.0 < whole.0 {
            by_group
        } else {
            whole
        }
    } else {
        whole
    };
    (blocks, split)
}

/// The units of blocks of `nt` tiles, one per column group when `split`.
fn units(tiles: usize, nt: usize, split: bool, w: &PackedWinograd) -> Vec<Unit> {
    let ngroups = w.groups.len();
    let mut units = Vec::new();
    for t0 in (0..tiles).step_by(nt) {
        let t1 = (t0 + nt).min(tiles);
        if split {
            units.extend(w.groups.iter().enumerate().map(|(gi, gr)| Unit {
                t0,
                t1,
                g0: gi,
                g1: gi + 1,
                col0: gr.co0,
                cols: gr.nv * LANES,
            }));
        } else {
            units.push(Unit {
                t0,
                t1,
                g0: 0,
                g1: ngroups,
                col0: 0,
                cols: padded_width(&w.groups),
            });
        }
    }
    units
}

/// One GEMM of a position and a column group: `m[r] (+)= v[r] x b` for rows `r < nt`.
pub(super) struct Product {
    /// Row `r` of the transformed inputs at `v + r * ldv`, `kc` floats.
    pub(super) v: *const f32,
    pub(super) ldv: usize,
    /// Packed transformed weights, `kc` rows of `NV * 16` floats.
    pub(super) b: *const f32,
    pub(super) kc: usize,
    /// Row `r` of the products at `m + r * ldm`, `NV * 16` floats.
    pub(super) m: *mut f32,
    pub(super) ldm: usize,
    pub(super) nt: usize,
    /// Add the products already in `m` (earlier channel chunks).
    pub(super) add_earlier: bool,
    /// Weights to prefetch while the first row tiles run (the next product's, when they
    /// stream from memory: read once per call).
    pub(super) next: Option<*const f32>,
}

/// Computes a [`Product`], `MR` rows at a time.
///
/// # Safety
/// The pointers of `p` must be valid for `nt` rounded up to `MR` rows (rows past `nt`
/// compute unused products).
#[inline(always)]
pub(super) unsafe fn multiply_rows<L: Level, const MR: usize, const NV: usize>(p: &Product) {
    let mut r = 0;
    while r < p.nt {
        let mut a = [p.v; MR];
        for i in 0..MR {
            a[i] = p.v.add((r + i) * p.ldv);
        }
        let mut acc: Tile<L, MR, NV> = zero_tile::<L, MR, NV>();
        match p
            .next
            .and_then(|next| prefetch_share::<NV>(next, p.kc, r / MR))
        {
            Some(pf) => {
                accumulate_prefetching::<L, MR, NV>(&mut acc, &a, p.b, NV * LANES, p.kc, pf)
            }
            None => accumulate::<L, MR, NV>(&mut acc, &a, p.b, NV * LANES, p.kc),
        }
        let out = p.m.add(r * p.ldm);
        if p.add_earlier {
            add_from::<L, MR, NV>(&mut acc, out, p.ldm);
        }
        store_tile::<L, MR, NV>(out, p.ldm, &acc);
        r += MR;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each position's block starts an odd number of cache lines after the previous one
    /// (36 consecutive positions then fall into 36 different L1 sets of 64), and never
    /// overlaps it.
    #[test]
    fn position_blocks_are_an_odd_number_of_lines_apart() {
        for rows in [1, 2, 24, 48, 72, 96, 168, 4104] {
            for width in [16, 32, 48, 64, 144, 256, 1216] {
                let stride = position_stride(rows, width);
                assert!(stride >= rows * width && stride <= rows * width + LANES);
                assert!(stride.is_multiple_of(LANES));
                assert_eq!((stride / LANES) % 2, 1, "rows {rows} width {width}");
                let sets: std::collections::HashSet<usize> =
                    (0..POS).map(|pos| (pos * stride / LANES) % 64).collect();
                assert_eq!(sets.len(), POS, "rows {rows} width {width}");
            }
        }
    }
}
