//! Dense convolution (groups = 1) over NHWC input as an implicit GEMM.
//!
//! Output pixels are GEMM rows, output channels GEMM columns and `(tap, input channel)` the
//! reduction. The microkernel ([`accumulate`]) takes one pointer per pixel row, so a tap is
//! just a shifted pointer into the input and a tap outside the image points at a row of
//! zeros: no im2col and no padded copy of the input.
//!
//! Loop nest of one work unit (a block of output pixels x a range of column groups):
//! for each column group (16/32/48 output channels), for each reduction block (a few taps x
//! a chunk of input channels, about [`KC_TARGET`] long, whose packed weights stay in L1),
//! for each tile of `MR` pixels: accumulate in registers; partial sums of a unit with several
//! reduction blocks wait in a per-thread buffer; the last block adds bias, applies the
//! activation and the residual, and stores.

// Constant-bound index loops over tiles keep them in registers (see gemm.rs).
#![allow(clippy::needless_range_loop)]

use std::cell::Cell;

use rayon::prelude::*;

use super::gemm::{
    accumulate, accumulate_prefetching, add_from, prefetch_share, store_tile, zero_tile, Tile,
};
use super::isa::{dispatch_isa, dispatch_tile, Isa};
use super::partition::{column_groups, for_each_unit, ColumnGroup, OutPtr, KC_TARGET, SERIAL_MACS};
use super::simd::{activate, load_partial, store_partial, AlignedBuf, Level, LANES};
use super::{Activation, ConvGeometry};

/// With few input channels, whole taps are grouped into one block up to this length: a
/// single block avoids the partial-sum round trips, which halved the speed of the last
/// decoder block (9 taps x 64 channels); its 110 KiB of packed weights stay in L2.
const TAP_GROUP_TARGET: usize = 640;
/// Largest block of output pixels per work unit (keeps the unit's input rows in L2).
const MAX_PIXEL_BLOCK: usize = 384;
/// Pixel blocks of the direct conv are multiples of the AVX-512 tile height (other levels'
/// shorter tiles may end a block with a partial tile).
const BLOCK_ALIGN: usize = 8;

/// Dense `kernel x kernel` weights, repacked once at load time for the microkernel.
///
/// Output channels are split into groups of 1, 2 or 3 vectors of 16 (mostly 3, the widest
/// tile the AVX-512 register file holds); each group is stored as
/// `[tap = ky * k + kx][input channel][16 * nv lanes]`, zero past `cout`.
pub struct PackedConv {
    cout: usize,
    cin: usize,
    kernel: usize,
    groups: Vec<ColumnGroup>,
    data: AlignedBuf,
}

impl PackedConv {
    /// Pack PyTorch-layout weights `[cout][cin][kernel][kernel]`.
    pub fn pack(w_oihw: &[f32], cout: usize, cin: usize, kernel: usize) -> Self {
        assert!(
            cout > 0 && cin > 0 && kernel > 0,
            "empty convolution weights"
        );
        assert_eq!(
            w_oihw.len(),
            cout * cin * kernel * kernel,
            "conv weight length"
        );
        let taps = kernel * kernel;
        let (groups, len) = column_groups(cout, taps * cin);
        let mut buf = AlignedBuf::zeroed(len);
        let data = buf.as_mut_slice();
        for group in &groups {
            let nr = group.nv * LANES;
            for tap in 0..taps {
                for ci in 0..cin {
                    let dst = group.offset + (tap * cin + ci) * nr;
                    for lane in 0..nr {
                        let co = group.co0 + lane;
                        if co < cout {
                            data[dst + lane] = w_oihw[(co * cin + ci) * taps + tap];
                        }
                    }
                }
            }
        }
        PackedConv {
            cout,
            cin,
            kernel,
            groups,
            data: buf,
        }
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    pub fn cin(&self) -> usize {
        self.cin
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }
}

/// A block of the reduction: taps `tap0..tap1`, input channels `c0..c1` of each.
#[derive(Clone, Copy, Debug)]
struct KBlock {
    tap0: usize,
    tap1: usize,
    c0: usize,
    c1: usize,
}

fn reduction_blocks(taps: usize, cin: usize) -> Vec<KBlock> {
    let mut blocks = Vec::new();
    if cin >= KC_TARGET {
        let chunks = cin.div_ceil(KC_TARGET);
        for tap in 0..taps {
            for i in 0..chunks {
                blocks.push(KBlock {
                    tap0: tap,
                    tap1: tap + 1,
                    c0: i * cin / chunks,
                    c1: (i + 1) * cin / chunks,
                });
            }
        }
    } else {
        let per_block = (TAP_GROUP_TARGET / cin).max(1);
        let n = taps.div_ceil(per_block);
        for i in 0..n {
            blocks.push(KBlock {
                tap0: i * taps / n,
                tap1: (i + 1) * taps / n,
                c0: 0,
                c1: cin,
            });
        }
    }
    blocks
}

/// One work unit: output pixels `p0..p1` for column groups `g0..g1`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    p0: usize,
    p1: usize,
    g0: usize,
    g1: usize,
}

/// How a convolution's output is cut into work units.
struct Plan {
    units: Vec<Unit>,
    parallel: bool,
}

/// Split the output into units: pixel blocks (at most [`MAX_PIXEL_BLOCK`], so a unit's input
/// rows and partial sums stay in L2, also when running serially), and column groups too when
/// there are few pixels. Splitting pixels re-reads the weights per block, splitting groups
/// re-reads the input per group; pick whichever moves fewer bytes for enough parallel units.
fn plan_units(pixels: usize, w: &PackedConv, input_len: usize, threads: usize) -> Plan {
    let ngroups = w.groups.len();
    // The packed weights hold (taps * cin) x (cout rounded up): one multiply-add per pixel each.
    let macs = pixels * w.data.as_slice().len();
    let parallel = threads > 1 && macs >= SERIAL_MACS;
    let min_blocks = pixels.div_ceil(MAX_PIXEL_BLOCK);
    let (blocks, by_group) = if parallel {
        let wanted = 4 * threads;
        // Blocks of 8 pixels at the finest (the AVX-512 tile height): with blocks of 24,
        // an 8x8 map gave 3 units to 2 threads and ran no faster than on one.
        let max_blocks = pixels.div_ceil(BLOCK_ALIGN);
        let blocks_for = |splits: usize| min_blocks.max(wanted.div_ceil(splits)).min(max_blocks);
        let cost =
            |blocks: usize, splits: usize| blocks * w.data.as_slice().len() + splits * input_len;
        let whole = blocks_for(1);
        let split = blocks_for(ngroups);
        if ngroups > 1 && cost(split, ngroups) < cost(whole, 1) {
            (split, true)
        } else {
            (whole, false)
        }
    } else {
        (min_blocks, false)
    };
    let block = pixels.div_ceil(blocks).next_multiple_of(BLOCK_ALIGN);
    let mut units = Vec::new();
    for p0 in (0..pixels).step_by(block) {
        let p1 = (p0 + block).min(pixels);
        if by_group {
            units.extend((0..ngroups).map(|g| Unit {
                p0,
                p1,
                g0: g,
                g1: g + 1,
            }));
        } else {
            units.push(Unit {
                p0,
                p1,
                g0: 0,
                g1: ngroups,
            });
        }
    }
    Plan { units, parallel }
}

struct ConvJob<'a> {
    x: &'a [f32],
    g: ConvGeometry,
    w: &'a PackedConv,
    /// Bias padded with zeros to the packed width.
    bias: &'a [f32],
    act: Activation,
    residual: Option<&'a [f32]>,
    y: OutPtr,
    y_len: usize,
    zeros: &'a [f32],
    kblocks: &'a [KBlock],
    /// For a 1x1 conv: the input is `x[p, c] * input_gate[c]` (a squeeze-excite read through).
    input_gate: Option<&'a [f32]>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_nhwc_isa(
    isa: Isa,
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedConv,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    conv2d_gated_nhwc_isa(isa, x, None, g, w, bias, act, residual, y)
}

/// [`conv2d_nhwc_isa`] on the input `x[p, c] * gate[c]` when `gate` is given (1x1, stride
/// 1, no padding only): a squeeze-excite's scaling read through, so that its scaled map is
/// never written. Each work unit scales its own pixels into a buffer in L2, the same
/// products the squeeze-excite would have stored, then runs the plain kernel on them. Not
/// for a conv to one channel, whose dot-product kernel sums in another order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_gated_nhwc_isa(
    isa: Isa,
    x: &[f32],
    gate: Option<&[f32]>,
    g: &ConvGeometry,
    w: &PackedConv,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    if let Some(gate) = gate {
        let pointwise = g.kernel == 1 && g.stride == 1 && g.pad_top == 0 && g.pad_left == 0;
        assert!(
            pointwise,
            "a gated input needs a 1x1 stride-1 conv without padding"
        );
        assert_eq!(gate.len(), g.cin, "input gate length");
        assert!(g.cout > 1, "a gated conv to one channel is not supported");
    }
    assert!(g.stride > 0, "conv stride must be positive");
    assert_eq!(
        (w.cin, w.cout, w.kernel),
        (g.cin, g.cout, g.kernel),
        "packed weights do not match the geometry"
    );
    assert_eq!(x.len(), g.input_len(), "conv input length");
    assert_eq!(y.len(), g.output_len(), "conv output length");
    assert_eq!(bias.len(), g.cout, "conv bias length");
    if let Some(r) = residual {
        assert_eq!(r.len(), y.len(), "conv residual length");
    }
    let pixels = g.out_h * g.out_w;
    if pixels == 0 {
        return;
    }
    if g.kernel == 1 && g.stride == 1 && g.cout == 1 && g.pad_top == 0 && g.pad_left == 0 {
        pointwise_to_one_channel(isa, x, g, w, bias[0], act, residual, y);
        return;
    }
    let parts = ConvParts::new(w, bias);
    let job = ConvJob {
        x,
        g: *g,
        w,
        bias: &parts.bias,
        act,
        residual,
        y: OutPtr(y.as_mut_ptr()),
        y_len: y.len(),
        zeros: &parts.zeros,
        kblocks: &parts.kblocks,
        input_gate: gate,
    };
    let plan = plan_units(pixels, w, x.len(), rayon::current_num_threads());
    for_each_unit(plan.parallel, &plan.units, |unit| {
        conv_unit_isa(isa, &job, unit)
    });
}

/// What a conv's work units read besides the input and weights, made once per call (or once
/// for many calls): the bias padded to the packed width, a zero pixel for padding taps, the
/// reduction blocks.
struct ConvParts {
    bias: Vec<f32>,
    zeros: Vec<f32>,
    kblocks: Vec<KBlock>,
}

impl ConvParts {
    fn new(w: &PackedConv, bias: &[f32]) -> Self {
        let mut padded = vec![0.0; w.cout.next_multiple_of(LANES)];
        padded[..w.cout].copy_from_slice(bias);
        ConvParts {
            bias: padded,
            zeros: vec![0.0; w.cin],
            kblocks: reduction_blocks(w.kernel * w.kernel, w.cin),
        }
    }
}

/// A 1x1 conv (stride 1, no padding, no residual) to 2 or more channels run on many runs of
/// pixels, on the calling thread, with its per-call parts made once: the fused MBConv front
/// expands a band of rows at a time with it. The same values as [`conv2d_nhwc_isa`] (which
/// sums a conv to one channel in another order, see `pointwise_to_one_channel`).
pub(crate) struct PointwiseRuns<'a> {
    w: &'a PackedConv,
    parts: ConvParts,
    act: Activation,
}

impl<'a> PointwiseRuns<'a> {
    pub(crate) fn new(w: &'a PackedConv, bias: &[f32], act: Activation) -> Self {
        assert_eq!(w.kernel, 1, "a pointwise conv is 1x1");
        assert!(w.cout > 1, "a conv to one channel sums in another order");
        assert_eq!(bias.len(), w.cout, "conv bias length");
        PointwiseRuns {
            w,
            parts: ConvParts::new(w, bias),
            act,
        }
    }

    /// `y = act(x w + bias)` for the `x.len() / cin` pixels of `x`.
    pub(crate) fn run(&self, isa: Isa, x: &[f32], y: &mut [f32]) {
        let (cin, cout) = (self.w.cin, self.w.cout);
        let pixels = x.len() / cin;
        assert!(
            x.len() == pixels * cin && y.len() == pixels * cout,
            "pointwise lengths"
        );
        if pixels == 0 {
            return;
        }
        let job = ConvJob {
            x,
            g: ConvGeometry {
                in_h: 1,
                in_w: pixels,
                cin,
                cout,
                kernel: 1,
                stride: 1,
                pad_top: 0,
                pad_left: 0,
                out_h: 1,
                out_w: pixels,
            },
            w: self.w,
            bias: &self.parts.bias,
            act: self.act,
            residual: None,
            y: OutPtr(y.as_mut_ptr()),
            y_len: y.len(),
            zeros: &self.parts.zeros,
            kblocks: &self.parts.kblocks,
            input_gate: None,
        };
        let groups = self.w.groups.len();
        for p0 in (0..pixels).step_by(MAX_PIXEL_BLOCK) {
            let p1 = (p0 + MAX_PIXEL_BLOCK).min(pixels);
            let unit = Unit {
                p0,
                p1,
                g0: 0,
                g1: groups,
            };
            conv_unit_isa(isa, &job, &unit);
        }
    }
}

dispatch_isa! {
    fn conv_unit_isa(job: &ConvJob<'_>, unit: &Unit) => conv_unit;
}

#[inline(always)]
fn conv_unit<L: Level>(job: &ConvJob<'_>, unit: &Unit) {
    if let Some(gate) = job.input_gate {
        gated_unit::<L>(job, gate, unit);
        return;
    }
    for group in &job.w.groups[unit.g0..unit.g1] {
        // SAFETY: `conv2d_nhwc_isa` checked every length the tile loop relies on.
        unsafe { dispatch_tile!(L, group.nv, conv_group(job, group, unit.p0, unit.p1)) }
    }
}

/// A unit of a gated 1x1 conv: its pixels' inputs scaled into a buffer, then the plain
/// kernel on the buffer as a one-row image whose outputs start at pixel `unit.p0`.
#[inline(always)]
fn gated_unit<L: Level>(job: &ConvJob<'_>, gate: &[f32], unit: &Unit) {
    let (cin, cout) = (job.g.cin, job.g.cout);
    let n = unit.p1 - unit.p0;
    let mut scaled = GATED.with(|cell| cell.take());
    scaled.resize(n * cin, 0.0);
    let x = &job.x[unit.p0 * cin..unit.p1 * cin];
    for (dst, src) in scaled.chunks_exact_mut(cin).zip(x.chunks_exact(cin)) {
        // The squeeze-excite's own products: x * gate, rounded once.
        for ((d, &v), &gc) in dst.iter_mut().zip(src).zip(gate) {
            *d = v * gc;
        }
    }
    let sub = ConvJob {
        x: &scaled,
        g: ConvGeometry {
            in_h: 1,
            in_w: n,
            out_h: 1,
            out_w: n,
            ..job.g
        },
        // SAFETY: the unit's outputs are pixels p0..p1, inside the checked output.
        y: OutPtr(unsafe { job.y.0.add(unit.p0 * cout) }),
        y_len: n * cout,
        residual: job.residual.map(|r| &r[unit.p0 * cout..unit.p1 * cout]),
        input_gate: None,
        ..*job
    };
    for group in &job.w.groups[unit.g0..unit.g1] {
        // SAFETY: `sub` is a checked conv of its own: n input and output pixels.
        unsafe { dispatch_tile!(L, group.nv, conv_group(&sub, group, 0, n)) }
    }
    GATED.with(|cell| cell.replace(scaled));
}

thread_local! {
    /// A gated unit's scaled inputs.
    static GATED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

thread_local! {
    /// Partial sums of a unit between reduction blocks.
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Output pixels `p0..p1` of one column group.
///
/// # Safety
/// The lengths in `job` must have been checked by `conv2d_nhwc_isa`.
#[inline(always)]
unsafe fn conv_group<L: Level, const MR: usize, const NV: usize>(
    job: &ConvJob<'_>,
    group: &ColumnGroup,
    p0: usize,
    p1: usize,
) {
    let nr = NV * LANES;
    if job.kblocks.len() == 1 {
        conv_group_blocks::<L, MR, NV>(job, group, p0, p1, std::ptr::null_mut());
    } else {
        // Borrow the buffer without running the kernel inside a closure: closures are not
        // compiled with the caller's target features.
        let mut partials = PARTIALS.with(|cell| cell.take());
        let needed = (p1 - p0).div_ceil(MR) * MR * nr;
        if partials.len() < needed {
            partials.resize(needed, 0.0);
        }
        conv_group_blocks::<L, MR, NV>(job, group, p0, p1, partials.as_mut_ptr());
        PARTIALS.with(|cell| cell.replace(partials));
    }
}

/// # Safety
/// As `conv_group`; `partials` must hold a tile row per pixel (rounded up to `MR`) when
/// there is more than one reduction block.
#[inline(always)]
unsafe fn conv_group_blocks<L: Level, const MR: usize, const NV: usize>(
    job: &ConvJob<'_>,
    group: &ColumnGroup,
    p0: usize,
    p1: usize,
    partials: *mut f32,
) {
    let g = &job.g;
    let nr = NV * LANES;
    let weights = job.w.data.as_slice().as_ptr().add(group.offset);
    let nblocks = job.kblocks.len();
    for (bi, kb) in job.kblocks.iter().enumerate() {
        let mut t0 = p0;
        let (mut oy0, mut ox0) = (p0 / g.out_w, p0 % g.out_w);
        while t0 < p1 {
            let valid = MR.min(p1 - t0);
            let origins = tile_origins::<MR>(g, oy0, ox0, valid);
            // Every reduction block sums from zero and then joins the earlier blocks' partial
            // sums: two-level summation, more accurate than one chain over the whole reduction.
            let mut acc: Tile<L, MR, NV> = zero_tile::<L, MR, NV>();
            for tap in kb.tap0..kb.tap1 {
                let (ky, kx) = ((tap / g.kernel) as isize, (tap % g.kernel) as isize);
                let mut a = [job.zeros.as_ptr(); MR];
                for m in 0..MR {
                    let (iy, ix) = (origins[m].0 + ky, origins[m].1 + kx);
                    if iy >= 0 && ix >= 0 && (iy as usize) < g.in_h && (ix as usize) < g.in_w {
                        let pixel = iy as usize * g.in_w + ix as usize;
                        a[m] = job.x.as_ptr().add(pixel * g.cin + kb.c0);
                    }
                }
                let b = weights.add((tap * g.cin + kb.c0) * nr);
                let kc = kb.c1 - kb.c0;
                // A block's weights arrive from L3 or DRAM (each is used once per forward
                // pass); its first tiles fetch the next block's meanwhile. A block is one
                // tap's channel chunk or whole taps: packed contiguously, it spans
                // `taps * kc` rows, and the next block follows it.
                let next = b.wrapping_add((kb.tap1 - kb.tap0) * kc * nr);
                if let Some(pf) = prefetch_share::<NV>(next, kc, (t0 - p0) / MR) {
                    accumulate_prefetching::<L, MR, NV>(&mut acc, &a, b, nr, kc, pf);
                } else {
                    accumulate::<L, MR, NV>(&mut acc, &a, b, nr, kc);
                }
            }
            if bi > 0 {
                add_from::<L, MR, NV>(&mut acc, partials.add((t0 - p0) * nr), nr);
            }
            if bi + 1 == nblocks {
                // The epilogue indexes rows up to a run-time bound; handing it a copy in
                // memory keeps `acc` indexed by constants only. Otherwise LLVM keeps the
                // tile on the stack and mirrors every FMA of the k-loop with a store (which
                // halved the speed of multi-block reductions).
                let mut staged = StagedTile([0.0; STAGED_LEN]);
                store_tile::<L, MR, NV>(staged.0.as_mut_ptr(), nr, &acc);
                store_outputs::<L, MR, NV>(job, group.co0, &staged.0, t0, valid);
            } else {
                store_tile::<L, MR, NV>(partials.add((t0 - p0) * nr), nr, &acc);
            }
            t0 += MR;
            ox0 += MR;
            while ox0 >= g.out_w {
                ox0 -= g.out_w;
                oy0 += 1;
            }
        }
    }
}

/// Top-left input coordinate (may be negative) of each pixel of the tile starting at output
/// pixel `(oy0, ox0)`. Rows past `valid` repeat the last valid pixel, so they read valid memory.
#[inline(always)]
fn tile_origins<const MR: usize>(
    g: &ConvGeometry,
    oy0: usize,
    ox0: usize,
    valid: usize,
) -> [(isize, isize); MR] {
    let mut origins = [(0isize, 0isize); MR];
    let (mut oy, mut ox) = (oy0, ox0);
    for m in 0..MR {
        origins[m] = (
            (oy * g.stride) as isize - g.pad_top as isize,
            (ox * g.stride) as isize - g.pad_left as isize,
        );
        if m + 1 < valid {
            ox += 1;
            if ox == g.out_w {
                ox = 0;
                oy += 1;
            }
        }
    }
    origins
}

/// Room for the largest register tile (8 rows x 3 vectors of 16).
const STAGED_LEN: usize = 8 * 3 * LANES;

/// A finished tile parked in memory for the epilogue (rows of `NV * 16` floats).
#[repr(align(64))]
struct StagedTile([f32; STAGED_LEN]);

/// Bias, activation, residual and store of the valid part of a finished tile, given in
/// memory (row `m` at `tile[m * NV * 16..]`).
///
/// # Safety
/// As `conv_group`.
#[inline(always)]
unsafe fn store_outputs<L: Level, const MR: usize, const NV: usize>(
    job: &ConvJob<'_>,
    co0: usize,
    tile: &[f32; STAGED_LEN],
    t0: usize,
    valid: usize,
) {
    let cout = job.g.cout;
    let mut bias = [L::zero(); NV];
    for v in 0..NV {
        bias[v] = L::load(job.bias.as_ptr().add(co0 + v * LANES));
    }
    if valid == MR && co0 + NV * LANES <= cout {
        store_full_tile::<L, MR, NV>(job, co0, tile, t0, &bias);
        return;
    }
    for m in 0..MR {
        // Constant trip count with an early exit keeps `acc` indexable by constants (in registers).
        if m >= valid {
            break;
        }
        let base = (t0 + m) * cout;
        for v in 0..NV {
            let c = co0 + v * LANES;
            if c >= cout {
                break;
            }
            let lanes = LANES.min(cout - c);
            debug_assert!(base + c + lanes <= job.y_len);
            let acc = L::load(tile.as_ptr().add((m * NV + v) * LANES));
            let mut val = activate::<L>(job.act, L::add(acc, bias[v]));
            let out = job.y.0.add(base + c);
            if lanes == LANES {
                if let Some(res) = job.residual {
                    val = L::add(val, L::load(res.as_ptr().add(base + c)));
                }
                L::store(out, val);
            } else {
                let mut vals = L::to_array(val);
                if let Some(res) = job.residual {
                    for lane in 0..lanes {
                        vals[lane] += res[base + c + lane];
                    }
                }
                std::ptr::copy_nonoverlapping(vals.as_ptr(), out, lanes);
            }
        }
    }
}

/// [`store_outputs`] of a tile whose rows and vectors are all in the output: constant trip
/// counts, so the `MR x NV` activations (swish: an exp and a reciprocal each, ~20
/// dependent operations) are independent chains the core overlaps, not one after another
/// behind per-vector bounds checks. Same operations per value, so the same values.
///
/// # Safety
/// As `store_outputs`, with all `MR` rows valid and `co0 + NV * 16 <= cout`.
#[inline(always)]
unsafe fn store_full_tile<L: Level, const MR: usize, const NV: usize>(
    job: &ConvJob<'_>,
    co0: usize,
    tile: &[f32; STAGED_LEN],
    t0: usize,
    bias: &[L::V; NV],
) {
    let cout = job.g.cout;
    debug_assert!((t0 + MR) * cout <= job.y_len);
    for m in 0..MR {
        let base = (t0 + m) * cout + co0;
        let mut vals = [L::zero(); NV];
        for v in 0..NV {
            let acc = L::load(tile.as_ptr().add((m * NV + v) * LANES));
            vals[v] = activate::<L>(job.act, L::add(acc, bias[v]));
        }
        for v in 0..NV {
            let mut val = vals[v];
            if let Some(res) = job.residual {
                val = L::add(val, L::load(res.as_ptr().add(base + v * LANES)));
            }
            L::store(job.y.0.add(base + v * LANES), val);
        }
    }
}

/// Pixels per task of [`pointwise_to_one_channel`].
const DOT_CHUNK: usize = 4096;

/// A 1x1 conv to a single channel (the mask head): one dot product per pixel. The GEMM
/// tile would fill 15 of its 16 lanes with zero columns.
#[allow(clippy::too_many_arguments)]
fn pointwise_to_one_channel(
    isa: Isa,
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedConv,
    bias: f32,
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    // Group 0 holds `[channel][16 lanes]` with the weight in lane 0.
    let weights: Vec<f32> = (0..g.cin)
        .map(|ci| w.data.as_slice()[w.groups[0].offset + ci * LANES])
        .collect();
    let cin = g.cin;
    let run = |i: usize, ys: &mut [f32]| {
        let p0 = i * DOT_CHUNK;
        let xs = &x[p0 * cin..(p0 + ys.len()) * cin];
        let res = residual.map(|r| &r[p0..p0 + ys.len()]);
        dot_rows_isa(isa, xs, &weights, bias, act, res, ys);
    };
    if rayon::current_num_threads() > 1 && y.len() * cin >= SERIAL_MACS {
        y.par_chunks_mut(DOT_CHUNK)
            .enumerate()
            .for_each(|(i, ys)| run(i, ys));
    } else {
        y.chunks_mut(DOT_CHUNK)
            .enumerate()
            .for_each(|(i, ys)| run(i, ys));
    }
}

dispatch_isa! {
    fn dot_rows_isa(
        x: &[f32],
        w: &[f32],
        bias: f32,
        act: Activation,
        residual: Option<&[f32]>,
        y: &mut [f32],
    ) => dot_rows;
}

/// `y[p] = act(x[p, ..] . w + bias) [+ residual[p]]`, 16 pixels per vector of results.
#[inline(always)]
fn dot_rows<L: Level>(
    x: &[f32],
    w: &[f32],
    bias: f32,
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    let cin = w.len();
    let full = cin / LANES * LANES;
    for (ci, ys) in y.chunks_mut(LANES).enumerate() {
        let mut dots = [0.0f32; LANES];
        for (j, dot) in dots.iter_mut().enumerate().take(ys.len()) {
            let row = &x[(ci * LANES + j) * cin..][..cin];
            let mut acc = L::zero();
            let mut c = 0;
            while c < full {
                // SAFETY: c + 16 <= full <= cin, the length of `row` and `w`.
                unsafe {
                    acc = L::fma(
                        L::load(row.as_ptr().add(c)),
                        L::load(w.as_ptr().add(c)),
                        acc,
                    );
                }
                c += LANES;
            }
            if full < cin {
                acc = L::fma(
                    load_partial::<L>(&row[full..]),
                    load_partial::<L>(&w[full..]),
                    acc,
                );
            }
            *dot = L::reduce_add(acc);
        }
        let mut v = activate::<L>(act, L::add(load_partial::<L>(&dots), L::splat(bias)));
        if let Some(r) = residual {
            v = L::add(v, load_partial::<L>(&r[ci * LANES..][..ys.len()]));
        }
        store_partial::<L>(ys, v);
    }
}
