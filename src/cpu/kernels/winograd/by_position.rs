//! The [`Schedule::ByPosition`](super::Schedule::ByPosition) schedule: three phases over
//! buffers shared by the threads, so that each transformed weight is read once in total:
//! input transforms by (tile row, channel chunk), products by (position, column group),
//! output transforms by tile row.

use std::cell::Cell;

use super::input::transform_inputs;
use super::output::{transform_outputs, OutputTiles};
use super::schedule::{multiply_rows, position_stride, Product, PIXEL_ALIGN};
use super::{WinoJob, POS, TILE};
use crate::cpu::kernels::isa::{dispatch_isa, dispatch_tile, Isa};
use crate::cpu::kernels::partition::{for_each_unit, padded_width, OutPtr};
use crate::cpu::kernels::simd::{Level, LANES};

thread_local! {
    /// The by-position schedule's `V` and `M`, kept by the calling thread between calls.
    static SHARED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The buffers of the by-position schedule: `V[pos][row = tile][ldv]` (all input
/// channels) and `M[pos][row = tile][coutp]`, positions `v_stride` and `m_stride` floats
/// apart (see `position_stride`).
struct Shared {
    v: OutPtr,
    m: OutPtr,
    tiles: usize,
    v_stride: usize,
    m_stride: usize,
    ldv: usize,
    coutp: usize,
}

/// Runs the three phases.
pub(super) fn run(isa: Isa, job: &WinoJob<'_>) {
    let (g, plan) = (&job.g, job.plan);
    let tiles_h = g.out_h.div_ceil(TILE);
    let tiles = plan.tiles_w * tiles_h;
    let rows = tiles.next_multiple_of(PIXEL_ALIGN);
    let ldv = g.cin.next_multiple_of(LANES);
    let coutp = padded_width(&job.w.groups);
    let (v_stride, m_stride) = (position_stride(rows, ldv), position_stride(rows, coutp));
    let (v_len, m_len) = (POS * v_stride, POS * m_stride);
    let mut buf = SHARED.with(|cell| cell.take());
    if buf.len() < v_len + m_len {
        buf.resize(v_len + m_len, 0.0);
    }
    let (v, m) = buf.split_at_mut(v_len);
    let shared = Shared {
        v: OutPtr(v.as_mut_ptr()),
        m: OutPtr(m.as_mut_ptr()),
        tiles,
        v_stride,
        m_stride,
        ldv,
        coutp,
    };
    let input_units: Vec<(usize, usize)> = (0..tiles_h)
        .flat_map(|ty| (0..plan.chunks.len()).map(move |ci| (ty, ci)))
        .collect();
    for_each_unit(plan.parallel, &input_units, |&(ty, ci)| {
        inputs_isa(isa, job, &shared, ty, ci)
    });
    let product_units: Vec<(usize, usize)> = (0..POS)
        .flat_map(|pos| (0..job.w.groups.len()).map(move |gi| (pos, gi)))
        .collect();
    for_each_unit(plan.parallel, &product_units, |&(pos, gi)| {
        products_isa(isa, job, &shared, pos, gi)
    });
    let output_units: Vec<usize> = (0..tiles_h).collect();
    for_each_unit(plan.parallel, &output_units, |&ty| {
        outputs_isa(isa, job, &shared, ty)
    });
    SHARED.with(|cell| cell.replace(buf));
}

dispatch_isa! {
    fn inputs_isa(job: &WinoJob<'_>, s: &Shared, ty: usize, ci: usize) => inputs;
}

dispatch_isa! {
    fn products_isa(job: &WinoJob<'_>, s: &Shared, pos: usize, gi: usize) => products;
}

dispatch_isa! {
    fn outputs_isa(job: &WinoJob<'_>, s: &Shared, ty: usize) => outputs;
}

/// Transform the inputs of tile row `ty`, channel chunk `ci`, into `V`.
#[inline(always)]
fn inputs<L: Level>(job: &WinoJob<'_>, s: &Shared, ty: usize, ci: usize) {
    let tiles_w = job.plan.tiles_w;
    let (c0, c1) = job.plan.chunks[ci];
    let t0 = ty * tiles_w;
    // SAFETY: `V` holds `rows >= tiles` rows of `ldv >= cin` (rounded up to 16) floats per
    // position; units write disjoint (tile, channel) ranges.
    unsafe {
        let v = s.v.0.add(t0 * s.ldv + c0);
        transform_inputs::<L>(job, t0, t0 + tiles_w, c0, c1, v, s.v_stride, s.ldv);
    }
}

/// `M[pos][.., group] = V[pos] x U[pos, group]`, all tiles, channel chunk by chunk.
#[inline(always)]
fn products<L: Level>(job: &WinoJob<'_>, s: &Shared, pos: usize, gi: usize) {
    let group = &job.w.groups[gi];
    // SAFETY: `rows` is a multiple of every tile height, so the row tiles stay inside the
    // position's `rows` rows; units write disjoint (position, column group) blocks of `M`.
    unsafe {
        let chunks = &job.plan.chunks;
        for (ci, &(c0, c1)) in chunks.iter().enumerate() {
            // The weights needed next on this thread: the next chunk's, else those of the
            // next unit (units run in order on a thread): (pos, gi + 1) or (pos + 1, 0).
            let next = if ci + 1 < chunks.len() {
                job.w.weights(group, pos, chunks[ci + 1].0)
            } else if gi + 1 < job.w.groups.len() {
                job.w.weights(&job.w.groups[gi + 1], pos, 0)
            } else if pos + 1 < POS {
                job.w.weights(&job.w.groups[0], pos + 1, 0)
            } else {
                job.w.weights(group, pos, c0)
            };
            let product = Product {
                v: s.v.0.add(pos * s.v_stride + c0),
                ldv: s.ldv,
                b: job.w.weights(group, pos, c0),
                kc: c1 - c0,
                m: s.m.0.add(pos * s.m_stride + group.co0),
                ldm: s.coutp,
                nt: s.tiles,
                add_earlier: ci > 0,
                next: Some(next),
            };
            dispatch_tile!(L, group.nv, multiply_rows(&product));
        }
    }
}

/// Output transforms of tile row `ty`.
#[inline(always)]
fn outputs<L: Level>(job: &WinoJob<'_>, s: &Shared, ty: usize) {
    let t0 = ty * job.plan.tiles_w;
    let tiles = OutputTiles {
        t0,
        t1: t0 + job.plan.tiles_w,
        col0: 0,
        cols: s.coutp,
        pos_stride: s.m_stride,
    };
    // SAFETY: `M` holds `POS * m_stride` floats; units store disjoint output pixels.
    unsafe { transform_outputs::<L>(job, &tiles, s.m.0.add(t0 * s.coutp)) }
}
