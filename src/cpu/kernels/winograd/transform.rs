//! The three transforms of Winograd F(4x4, 3x3) (Lavin & Gray's matrices, interpolation
//! points 0, +-1, +-2, inf): kernels `G g G^T` (in f64, once, when packing), input patches
//! `B^T d B` and products `A^T m A` (16 lanes of channels at a time, in registers).

// Constant-bound index loops over tiles keep them in registers (see gemm.rs).
#![allow(clippy::needless_range_loop)]

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

/// `B^T d B` of a 6x6 patch (row-major).
#[inline(always)]
pub(super) fn input_tile<L: Level>(d: &[L::V; POS]) -> [L::V; POS] {
    let mut t = [L::zero(); POS];
    for col in 0..PATCH {
        let r = input_1d::<L>([
            d[col],
            d[PATCH + col],
            d[2 * PATCH + col],
            d[3 * PATCH + col],
            d[4 * PATCH + col],
            d[5 * PATCH + col],
        ]);
        for i in 0..PATCH {
            t[i * PATCH + col] = r[i];
        }
    }
    let mut out = [L::zero(); POS];
    for i in 0..PATCH {
        let row = i * PATCH;
        let r = input_1d::<L>([
            t[row],
            t[row + 1],
            t[row + 2],
            t[row + 3],
            t[row + 4],
            t[row + 5],
        ]);
        out[row..row + PATCH].copy_from_slice(&r);
    }
    out
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

/// `A^T m A` of a 6x6 block of products: the 4x4 output tile (row-major).
#[inline(always)]
pub(super) fn output_tile<L: Level>(m: &[L::V; POS]) -> [L::V; TILE * TILE] {
    let mut t = [L::zero(); TILE * PATCH];
    for col in 0..PATCH {
        let r = output_1d::<L>([
            m[col],
            m[PATCH + col],
            m[2 * PATCH + col],
            m[3 * PATCH + col],
            m[4 * PATCH + col],
            m[5 * PATCH + col],
        ]);
        for i in 0..TILE {
            t[i * PATCH + col] = r[i];
        }
    }
    let mut out = [L::zero(); TILE * TILE];
    for i in 0..TILE {
        let row = i * PATCH;
        let r = output_1d::<L>([
            t[row],
            t[row + 1],
            t[row + 2],
            t[row + 3],
            t[row + 4],
            t[row + 5],
        ]);
        for j in 0..TILE {
            out[i * TILE + j] = r[j];
        }
    }
    out
}
