//! The register-tiled GEMM microkernel every dense kernel is built on.
//!
//! A tile is `MR` rows of A (each given by its own pointer, so rows may be arbitrary
//! pixels: shifted taps, rows split across image lines, zero rows for padding) times
//! `NV * 16` columns of B, accumulated in `MR x NV` vector registers.
//!
//! Tiles are only touched through constant-bound index loops (no iterators, no whole-array
//! copies), which LLVM fully unrolls, keeping the tile in registers.

#![allow(clippy::needless_range_loop)]

use super::isa::Isa;
use super::simd::{Level, LANES};

/// Width (in vectors of 16) of the next tile when `remaining` vectors of columns are left:
/// the widest tile the selected ISA fits ([`Isa::widest_tile`]: 3, or 1 on AVX2), except
/// that with 3 a remainder of 4 is split 2 + 2 and 2 stays 2, so that a 1-vector tile
/// (8 broadcasts per 8 FMAs) only happens for a single vector of columns.
pub(crate) fn next_tile_width(remaining: usize) -> usize {
    let widest = Isa::selected().widest_tile();
    if widest < 3 {
        return remaining.min(widest);
    }
    match remaining {
        0..=2 => remaining,
        4 => 2,
        _ => 3,
    }
}

/// Register accumulators of one tile.
pub(crate) type Tile<L, const MR: usize, const NV: usize> = [[<L as Level>::V; NV]; MR];

#[inline(always)]
pub(crate) fn zero_tile<L: Level, const MR: usize, const NV: usize>() -> Tile<L, MR, NV> {
    [[L::zero(); NV]; MR]
}

/// `acc[m][v] += sum_k a[m][k] * b[k][16 v ..16 v + 16]`.
///
/// # Safety
/// Each `a[m]` must be readable for `kc` floats; `b` must be readable at
/// `b + k * ldb .. b + k * ldb + NV * 16` for every `k < kc`.
#[inline(always)]
pub(crate) unsafe fn accumulate<L: Level, const MR: usize, const NV: usize>(
    acc: &mut Tile<L, MR, NV>,
    a: &[*const f32; MR],
    b: *const f32,
    ldb: usize,
    kc: usize,
) {
    for k in 0..kc {
        fma_step::<L, MR, NV>(acc, a, b.add(k * ldb), k);
    }
}

/// One step of the reduction: `acc[m][v] += a[m][k] * b_row[16 v .. 16 v + 16]`.
///
/// # Safety
/// As [`accumulate`], for this `k` (`b_row = b + k * ldb`).
#[inline(always)]
unsafe fn fma_step<L: Level, const MR: usize, const NV: usize>(
    acc: &mut Tile<L, MR, NV>,
    a: &[*const f32; MR],
    b_row: *const f32,
    k: usize,
) {
    let mut bv = [L::zero(); NV];
    for v in 0..NV {
        bv[v] = L::load(b_row.add(v * LANES));
    }
    for m in 0..MR {
        let am = L::splat(*a[m].add(k));
        for v in 0..NV {
            acc[m][v] = L::fma(am, bv[v], acc[m][v]);
        }
    }
}

/// [`accumulate`] that also prefetches into L2 one cache line per step, `kc` consecutive
/// lines from `next`: a share of the weights needed next (see [`prefetch_share`]), so that
/// streaming them from memory overlaps the FMAs.
///
/// # Safety
/// As [`accumulate`]; `next` is only prefetched (a hint: never faults, may be past the end).
#[inline(always)]
pub(crate) unsafe fn accumulate_prefetching<L: Level, const MR: usize, const NV: usize>(
    acc: &mut Tile<L, MR, NV>,
    a: &[*const f32; MR],
    b: *const f32,
    ldb: usize,
    kc: usize,
    next: *const f32,
) {
    for k in 0..kc {
        prefetch_l2(next.wrapping_add(k * LANES));
        fma_step::<L, MR, NV>(acc, a, b.add(k * ldb), k);
    }
}

/// The lines row tile `tile` of a reduction block prefetches from the next block's
/// `kc x NV * 16` weights at `next`: tiles 0..NV take `kc` lines each (one per step, one
/// prefetch per 8 * NV FMAs), spread over the block instead of queued up in its first tile;
/// `None` for later tiles.
#[inline(always)]
pub(crate) fn prefetch_share<const NV: usize>(
    next: *const f32,
    kc: usize,
    tile: usize,
) -> Option<*const f32> {
    (tile < NV).then(|| next.wrapping_add(tile * kc * LANES))
}

/// Hint the cache line holding `p` into L2 (any address: a prefetch never faults).
#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is baseline on x86-64; prefetching does not access memory architecturally.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        _mm_prefetch::<_MM_HINT_T1>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Add memory into a tile (row `m` at `c + m * ldc`).
///
/// # Safety
/// `c + m * ldc .. + NV * 16` must be readable for every `m < MR`.
#[inline(always)]
pub(crate) unsafe fn add_from<L: Level, const MR: usize, const NV: usize>(
    t: &mut Tile<L, MR, NV>,
    c: *const f32,
    ldc: usize,
) {
    for m in 0..MR {
        for v in 0..NV {
            t[m][v] = L::add(t[m][v], L::load(c.add(m * ldc + v * LANES)));
        }
    }
}

/// Store a tile to memory (row `m` at `c + m * ldc`).
///
/// # Safety
/// `c + m * ldc .. + NV * 16` must be writable for every `m < MR`.
#[inline(always)]
pub(crate) unsafe fn store_tile<L: Level, const MR: usize, const NV: usize>(
    c: *mut f32,
    ldc: usize,
    t: &Tile<L, MR, NV>,
) {
    for m in 0..MR {
        for v in 0..NV {
            L::store(c.add(m * ldc + v * LANES), t[m][v]);
        }
    }
}

/// Add a tile into memory (row `m` at `c + m * ldc`).
///
/// # Safety
/// `c + m * ldc .. + NV * 16` must be readable and writable for every `m < MR`.
#[inline(always)]
pub(crate) unsafe fn add_tile_to<L: Level, const MR: usize, const NV: usize>(
    c: *mut f32,
    ldc: usize,
    t: &Tile<L, MR, NV>,
) {
    for m in 0..MR {
        for v in 0..NV {
            let p = c.add(m * ldc + v * LANES);
            L::store(p, L::add(L::load(p), t[m][v]));
        }
    }
}
