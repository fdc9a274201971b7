//! The [`Schedule::TileBlocked`](super::Schedule::TileBlocked) schedule: each unit (a block
//! of tiles x some column groups) transforms its own inputs, channel chunk by chunk, into a
//! per-thread scratch that stays in L2, multiplies them by every position's weights, and
//! transforms its outputs.

use std::cell::Cell;

use super::input::transform_inputs;
use super::output::{transform_outputs, OutputTiles};
use super::schedule::{multiply_rows, position_stride, Product, Unit};
use super::{WinoJob, POS};
use crate::cpu::kernels::isa::{dispatch_isa, dispatch_tile, Isa};
use crate::cpu::kernels::partition::for_each_unit;
use crate::cpu::kernels::simd::Level;

/// Runs every unit of the job's plan.
pub(super) fn run(isa: Isa, job: &WinoJob<'_>) {
    let plan = job.plan;
    for_each_unit(plan.parallel, &plan.units, |unit| {
        wino_unit_isa(isa, job, unit)
    });
}

dispatch_isa! {
    fn wino_unit_isa(job: &WinoJob<'_>, unit: &Unit) => wino_unit;
}

thread_local! {
    /// A unit's `V` (one channel chunk) and `M`.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

#[inline(always)]
fn wino_unit<L: Level>(job: &WinoJob<'_>, unit: &Unit) {
    let plan = job.plan;
    let v_stride = position_stride(plan.rows, plan.kcs);
    let m_stride = position_stride(plan.rows, unit.cols);
    let (v_len, m_len) = (POS * v_stride, POS * m_stride);
    // Taken out of the cell, not used inside a closure: closures are not compiled with the
    // caller's target features.
    let mut scratch = SCRATCH.with(|cell| cell.take());
    if scratch.len() < v_len + m_len {
        scratch.resize(v_len + m_len, 0.0);
    }
    let (v, m) = scratch.split_at_mut(v_len);
    // SAFETY: `winograd` checked the lengths; `v` and `m` hold `POS` blocks of `rows` rows
    // of `kcs` and `unit.cols` floats, `v_stride` and `m_stride` apart.
    unsafe {
        let kcs = plan.kcs;
        for (ci, &(c0, c1)) in plan.chunks.iter().enumerate() {
            let vp = v.as_mut_ptr();
            transform_inputs::<L>(job, unit.t0, unit.t1, c0, c1, vp, v_stride, kcs);
            for pos in 0..POS {
                for group in &job.w.groups[unit.g0..unit.g1] {
                    let mp = m.as_mut_ptr();
                    let product = Product {
                        v: v.as_ptr().add(pos * v_stride),
                        ldv: kcs,
                        b: job.w.weights(group, pos, c0),
                        kc: c1 - c0,
                        m: mp.add(pos * m_stride + group.co0 - unit.col0),
                        ldm: unit.cols,
                        nt: unit.t1 - unit.t0,
                        add_earlier: ci > 0,
                        next: None,
                    };
                    dispatch_tile!(L, group.nv, multiply_rows(&product));
                }
            }
        }
        let out = OutputTiles {
            t0: unit.t0,
            t1: unit.t1,
            col0: unit.col0,
            cols: unit.cols,
            pos_stride: m_stride,
        };
        transform_outputs::<L>(job, &out, m.as_ptr());
    }
    SCRATCH.with(|cell| cell.replace(scratch));
}
