//! The end of a Winograd conv: the output transform of each tile's products, bias,
//! activation and residual, stored to the NHWC output.

// Constant-bound index loops over tiles keep them in registers (see gemm.rs).
#![allow(clippy::needless_range_loop)]

use super::transform::output_tile_from;
use super::{WinoJob, TILE};
use crate::cpu::kernels::simd::{activate, Level, LANES};

/// Tiles `t0..t1` and output channels `col0..col0 + cols` of a products buffer laid out
/// `[pos][row][cols]` (tile `t` in row `t - t0`), positions `pos_stride` floats apart.
pub(super) struct OutputTiles {
    pub(super) t0: usize,
    pub(super) t1: usize,
    pub(super) col0: usize,
    pub(super) cols: usize,
    pub(super) pos_stride: usize,
}

/// Output transform, bias, activation, residual and store of some tiles.
///
/// # Safety
/// `m` must hold `POS * unit.pos_stride` floats; the job's lengths must have been
/// checked.
#[inline(always)]
pub(super) unsafe fn transform_outputs<L: Level>(
    job: &WinoJob<'_>,
    unit: &OutputTiles,
    m: *const f32,
) {
    let g = &job.g;
    let cout = g.cout;
    for t in unit.t0..unit.t1 {
        let (ty, tx) = (t / job.plan.tiles_w, t % job.plan.tiles_w);
        let (oy0, ox0) = (ty * TILE, tx * TILE);
        let (hv, wv) = ((g.out_h - oy0).min(TILE), (g.out_w - ox0).min(TILE));
        let mut col = 0;
        while col < unit.cols && unit.col0 + col < cout {
            let co = unit.col0 + col;
            let lanes = LANES.min(cout - co);
            let first = m.add((t - unit.t0) * unit.cols + col);
            let out = output_tile_from::<L>(first, unit.pos_stride);
            let bias = L::load(job.bias.as_ptr().add(co));
            for r in 0..TILE {
                if r >= hv {
                    break;
                }
                for c in 0..TILE {
                    if c >= wv {
                        break;
                    }
                    let idx = ((oy0 + r) * g.out_w + ox0 + c) * cout + co;
                    let val = activate::<L>(job.act, L::add(out[r * TILE + c], bias));
                    store_output::<L>(job, idx, lanes, val);
                }
            }
            col += LANES;
        }
    }
}

/// Store `lanes` channels at output element `idx`, adding the residual.
///
/// # Safety
/// `idx + lanes` must be within the output.
#[inline(always)]
unsafe fn store_output<L: Level>(job: &WinoJob<'_>, idx: usize, lanes: usize, mut val: L::V) {
    let out = job.y.0.add(idx);
    if lanes == LANES {
        if let Some(res) = job.residual {
            val = L::add(val, L::load(res.as_ptr().add(idx)));
        }
        L::store(out, val);
    } else {
        let mut vals = L::to_array(val);
        if let Some(res) = job.residual {
            for lane in 0..lanes {
                vals[lane] += res[idx + lane];
            }
        }
        std::ptr::copy_nonoverlapping(vals.as_ptr(), out, lanes);
    }
}
