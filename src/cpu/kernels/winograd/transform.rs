//! The three transforms of Winograd F(4x4, 3x3) (Lavin & Gray's matrices, interpolation
//! points 0, +-1, +-2, inf): kernels `G g G^T` (in f64, once, when packing), input patches
//! `B^T d B` and products `A^T m A` (16 lanes of channels at a time, in registers).

// Constant-bound index loops over tiles keep them in registers (see gemm.rs).
#![allow(clippy::needless_range_loop)]

use std::mem::MaybeUninit;

use super::{PATCH, POS, TILE};
use crate::cpu::kernels::simd::Level;

/// Kernel transform `G` (6 x 3).
const G: [[f64; 3]; PATCH] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `G g G^T` in f64 for one 3x3 kernel `g` (row-major), row-major 6x6.
pub(super) fn transform_kernel(g: &[f32]) -> [f64; POS] {
    let mut t = [[0.0f64; 3]; PATCH];
    for i in 0..PATCH {
        for l in 0..3 {
            t[i][l] = (0..3).map(|k| G[i][k] * g[k * 3 + l] as f64).sum();
        }
    }
    let mut u = [0.0; POS];
    for i in 0..PATCH {
        for j in 0..PATCH {
            u[i * PATCH + j] = (0..3).map(|l| t[i][l] * G[j][l]).sum();
        }
    }
    u
}

/// `B^T d` for one column (or row) of 6 inputs.
#[inline(always)]
fn input_1d<L: Level>(d: [L::V; PATCH]) -> [L::V; PATCH] {
    let (two, four, five) = (L::splat(2.0), L::splat(4.0), L::splat(-5.0));
    let neg4 = L::splat(-4.0);
    [
        L::fma(four, d[0], L::fma(five, d[2], d[4])),
        L::fma(neg4, L::add(d[1], d[2]), L::add(d[3], d[4])),
        L::fma(four, L::sub(d[1], d[2]), L::sub(d[4], d[3])),
        L::fma(two, L::sub(d[3], d[1]), L::sub(d[4], d[2])),
        L::fma(two, L::sub(d[1], d[3]), L::sub(d[4], d[2])),
        L::fma(four, d[1], L::fma(five, d[3], d[5])),
    ]
}

/// The 36 values (row-major) of one patch's vector of channels, as the input transform
/// reads them: straight from where they lie, so that no patch array is built first.
pub(super) trait PatchSource<L: Level> {
    /// Patch value `i`.
    ///
    /// # Safety
    /// As the implementation's constructor says.
    unsafe fn value(&self, i: usize) -> L::V;
}

/// `B^T d B` of the patch `src` reads, stored as it is computed: product `pos` to
/// `dst + pos * stride`. Only the column pass's 36 results are held (uninitialized until
/// written: a zeroed 36-vector array costs a 2.3 KB memset per call on AVX2, where it
/// does not fit the registers anyway).
///
/// # Safety
/// `src` must be readable at all 36 values; `dst + pos * stride` writable for 16 floats.
#[inline(always)]
pub(super) unsafe fn input_tile_to<L: Level, S: PatchSource<L>>(
    src: &S,
    dst: *mut f32,
    stride: usize,
) {
    let mut t = [MaybeUninit::<L::V>::uninit(); POS];
    for col in 0..PATCH {
        let r = input_1d::<L>([
            src.value(col),
            src.value(PATCH + col),
            src.value(2 * PATCH + col),
            src.value(3 * PATCH + col),
            src.value(4 * PATCH + col),
            src.value(5 * PATCH + col),
        ]);
        for i in 0..PATCH {
            t[i * PATCH + col].write(r[i]);
        }
    }
    for i in 0..PATCH {
        let row = i * PATCH;
        // SAFETY: the column pass wrote every element.
        let r = input_1d::<L>([
            t[row].assume_init(),
            t[row + 1].assume_init(),
            t[row + 2].assume_init(),
            t[row + 3].assume_init(),
            t[row + 4].assume_init(),
            t[row + 5].assume_init(),
        ]);
        for j in 0..PATCH {
            L::store(dst.add((row + j) * stride), r[j]);
        }
    }
}

/// `A^T m` for one column (or row) of 6 products.
#[inline(always)]
fn output_1d<L: Level>(m: [L::V; PATCH]) -> [L::V; TILE] {
    let a = L::add(m[1], m[2]);
    let b = L::sub(m[1], m[2]);
    let c = L::add(m[3], m[4]);
    let d = L::sub(m[3], m[4]);
    [
        L::add(L::add(m[0], a), c),
        L::fma(L::splat(2.0), d, b),
        L::fma(L::splat(4.0), c, a),
        L::add(L::fma(L::splat(8.0), d, b), m[5]),
    ]
}

/// `A^T m A` of a 6x6 block of products, product `pos` read from `m + pos * stride`: the
/// 4x4 output tile (row-major). As in [`input_tile_to`], nothing is zero-filled first.
///
/// # Safety
/// `m + pos * stride` must be readable for 16 floats for every `pos < 36`.
#[inline(always)]
pub(super) unsafe fn output_tile_from<L: Level>(
    m: *const f32,
    stride: usize,
) -> [L::V; TILE * TILE] {
    let at = |pos: usize| m.wrapping_add(pos * stride);
    let mut t = [MaybeUninit::<L::V>::uninit(); TILE * PATCH];
    for col in 0..PATCH {
        let r = output_1d::<L>([
            L::load(at(col)),
            L::load(at(PATCH + col)),
            L::load(at(2 * PATCH + col)),
            L::load(at(3 * PATCH + col)),
            L::load(at(4 * PATCH + col)),
            L::load(at(5 * PATCH + col)),
        ]);
        for i in 0..TILE {
            t[i * PATCH + col].write(r[i]);
        }
    }
    let mut out = [MaybeUninit::<L::V>::uninit(); TILE * TILE];
    for i in 0..TILE {
        let row = i * PATCH;
        // SAFETY: the column pass wrote every element.
        let r = output_1d::<L>([
            t[row].assume_init(),
            t[row + 1].assume_init(),
            t[row + 2].assume_init(),
            t[row + 3].assume_init(),
            t[row + 4].assume_init(),
            t[row + 5].assume_init(),
        ]);
        for j in 0..TILE {
            out[i * TILE + j].write(r[j]);
        }
    }
    // SAFETY: the row pass wrote every element, and `MaybeUninit<V>` has `V`'s layout (no
    // `map` closure: closures are not compiled with the caller's target features).
    std::ptr::read(out.as_ptr().cast::<[L::V; TILE * TILE]>())
}
