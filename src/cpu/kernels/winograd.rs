//! Winograd F(4x4, 3x3) for stride-1 3x3 convolutions (the decoder's convs).
//!
//! Each 4x4 block of output pixels ("tile") is computed from its 6x6 input patch `d` as
//! `A^T [ (G g G^T) (.) (B^T d B) ] A` (Lavin & Gray's matrices, interpolation points
//! 0, +-1, +-2, inf): the 36 elementwise products, summed over input channels, are 36
//! independent GEMMs of (tiles x cin) by (cin x cout). That is 36 multiply-adds per 16
//! outputs per input channel instead of 144: 4x fewer than the direct convolution, plus
//! the transforms, which are O(cin + cout) per tile rather than O(cin * cout).
//!
//! Accuracy: the transformed weights are computed in f64 and rounded once; the input and
//! output transforms multiply by at most 8 and add up to 6 terms per pass, so the rounding
//! error grows by a small constant factor over the direct sum (checked against float64 by
//! the property tests).
//!
//! Loop nest of one work unit (a block of tiles x a range of column groups), keeping the
//! unit's transformed inputs `V` and products `M` in a per-thread scratch that fits L2:
//! for each chunk of input channels: transform the inputs into `V[pos][tile][channel]`; for
//! each of the 36 positions and each column group: `M[pos] (+)= V[pos] x U[pos]` with the
//! register-tiled microkernel. Finally the output transform adds bias, activation and the
//! residual, and stores.

// Constant-bound index loops over tiles keep them in registers (see gemm.rs).
#![allow(clippy::needless_range_loop)]

use std::cell::Cell;

use rayon::prelude::*;

use super::conv::{group_widths, ColumnGroup, OutPtr, KC_TARGET, PIXEL_ALIGN, SERIAL_MACS};
use super::gemm::{
    accumulate, accumulate_prefetching, add_from, prefetch_share, store_tile, zero_tile, Tile,
};
use super::isa::{dispatch_isa, dispatch_tile, Isa};
use super::simd::{activate, load_partial, AlignedBuf, Level, LANES};
use super::{Activation, ConvGeometry};

/// Output tile side.
const TILE: usize = 4;
/// Input patch side (TILE + 3 - 1).
const PATCH: usize = 6;
/// Elementwise products per tile (PATCH^2).
const POS: usize = PATCH * PATCH;
/// Target size in floats of one unit's scratch (`V` chunk + `M`): 1 MiB, half an L2.
const SCRATCH_FLOATS: usize = 1 << 18;

/// Kernel transform `G` (6 x 3).
const G: [[f64; 3]; PATCH] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// 3x3 weights transformed to the Winograd domain (`U = G g G^T`), packed for the
/// microkernel: output channels split into groups of 1-3 vectors of 16 (as `PackedConv`),
/// each stored as `[position][input channel][16 * nv lanes]`, zero past `cout`.
/// 4x the memory of the plain weights.
pub struct PackedWinograd {
    cout: usize,
    cin: usize,
    groups: Vec<ColumnGroup>,
    data: AlignedBuf,
}

impl PackedWinograd {
    /// Pack PyTorch-layout 3x3 weights `[cout][cin][3][3]`.
    pub fn pack(w_oihw: &[f32], cout: usize, cin: usize) -> Self {
        assert!(cout > 0 && cin > 0, "empty convolution weights");
        assert_eq!(w_oihw.len(), cout * cin * 9, "conv weight length");
        let mut groups = Vec::new();
        let (mut co0, mut offset) = (0, 0);
        for nv in group_widths(cout.div_ceil(LANES)) {
            groups.push(ColumnGroup { co0, nv, offset });
            co0 += nv * LANES;
            offset += POS * cin * nv * LANES;
        }
        let mut buf = AlignedBuf::zeroed(offset);
        let data = buf.as_mut_slice();
        for group in &groups {
            let nr = group.nv * LANES;
            for lane in 0..nr.min(cout - group.co0) {
                let co = group.co0 + lane;
                for ci in 0..cin {
                    let w = &w_oihw[(co * cin + ci) * 9..][..9];
                    let u = transform_kernel(w);
                    for (pos, &value) in u.iter().enumerate() {
                        data[group.offset + (pos * cin + ci) * nr + lane] = value as f32;
                    }
                }
            }
        }
        PackedWinograd {
            cout,
            cin,
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

    /// The packed weights of `group` at `pos`, from input channel `c0`.
    fn weights(&self, group: &ColumnGroup, pos: usize, c0: usize) -> *const f32 {
        let nr = group.nv * LANES;
        self.data.as_slice()[group.offset + (pos * self.cin + c0) * nr..].as_ptr()
    }
}

/// `G g G^T` in f64 for one 3x3 kernel `g` (row-major), row-major 6x6.
fn transform_kernel(g: &[f32]) -> [f64; POS] {
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
fn input_tile<L: Level>(d: &[L::V; POS]) -> [L::V; POS] {
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
fn output_tile<L: Level>(m: &[L::V; POS]) -> [L::V; TILE * TILE] {
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

/// One work unit: tiles `t0..t1` (raster order) for column groups `g0..g1`, whose
/// output channels are `col0..col0 + cols` (padded to whole vectors).
#[derive(Clone, Copy, Debug)]
struct Unit {
    t0: usize,
    t1: usize,
    g0: usize,
    g1: usize,
    col0: usize,
    cols: usize,
}

struct Plan {
    tiles_w: usize,
    /// Input channel chunks `(c0, c1)`, each starting at a multiple of 16.
    chunks: Vec<(usize, usize)>,
    /// Row stride of `V` (the longest chunk rounded up to 16).
    kcs: usize,
    /// Rows (tiles) reserved per unit in `V` and `M`: a multiple of every tile height.
    rows: usize,
    units: Vec<Unit>,
    parallel: bool,
}

/// Cut the work into units. Splitting tiles into blocks re-reads the transformed weights
/// per block; splitting column groups re-transforms the inputs per group: pick whichever
/// moves fewer floats, with enough units for the threads, each unit's scratch within
/// [`SCRATCH_FLOATS`] where possible.
fn plan(g: &ConvGeometry, w: &PackedWinograd, threads: usize) -> Plan {
    let tiles_w = g.out_w.div_ceil(TILE);
    let tiles = tiles_w * g.out_h.div_ceil(TILE);
    let nchunks = g.cin.div_ceil(KC_TARGET);
    let kcs = g.cin.div_ceil(nchunks).next_multiple_of(LANES);
    let chunks: Vec<(usize, usize)> = (0..g.cin)
        .step_by(kcs)
        .map(|c0| (c0, (c0 + kcs).min(g.cin)))
        .collect();
    let ngroups = w.groups.len();
    let coutp: usize = w.groups.iter().map(|gr| gr.nv * LANES).sum();
    let macs = POS * tiles * g.cin * coutp;
    let parallel = threads > 1 && macs >= SERIAL_MACS;
    let wanted = if parallel { 4 * threads } else { 1 };
    let weights = POS * g.cin * coutp;
    let inputs = POS * tiles * g.cin;
    // (cost, tile blocks, split by column group)
    let option = |split: bool| {
        let (cols, splits) = if split {
            (3 * LANES, ngroups)
        } else {
            (coutp, 1)
        };
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
    // Tile blocks in multiples of 8 rows (the AVX-512 tile height) when that costs nothing.
    let mut nt = tiles.div_ceil(blocks);
    if nt > 8 {
        nt = nt.next_multiple_of(8);
    }
    let rows = nt.next_multiple_of(PIXEL_ALIGN);
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
                cols: coutp,
            });
        }
    }
    Plan {
        tiles_w,
        chunks,
        kcs,
        rows,
        units,
        parallel,
    }
}

struct WinoJob<'a> {
    x: &'a [f32],
    layout: InputLayout<'a>,
    g: ConvGeometry,
    w: &'a PackedWinograd,
    /// Bias padded with zeros to the packed width.
    bias: &'a [f32],
    act: Activation,
    residual: Option<&'a [f32]>,
    y: OutPtr,
    /// `cin + 16` zeros: the "pixel" that taps outside the input read.
    zeros: &'a [f32],
    plan: &'a Plan,
}

/// How a Winograd convolution's work is organized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// Units of (tile block, column groups), each transforming its own inputs into a
    /// per-thread scratch that stays in L2; the transformed weights are read once per tile
    /// block. For many tiles (dec1..dec4).
    TileBlocks,
    /// Three phases over buffers shared by the threads: every input tile transformed once;
    /// one unit per (position, column group) multiplying all tiles by that weight matrix,
    /// so each is read once in total and stays hot while every tile uses it; the output
    /// transforms. For few tiles and many channels (dec0), where weights outweigh inputs:
    /// the tile-block schedule had tiny GEMMs streaming 45 MB of weights per tile block.
    ByPosition,
}

/// Largest transformed input (`POS * tiles * cin` floats, 16 MB) the by-position schedule
/// holds at once; dec0.conv1 at model size 512 (64 tiles x 1216 channels) takes 12.6 MB.
const BY_POSITION_MAX_V_FLOATS: usize = 4 << 20;

/// By position when the weights outweigh the inputs (padded columns >= tiles) and the
/// transformed input fits [`BY_POSITION_MAX_V_FLOATS`].
fn schedule_for(g: &ConvGeometry, w: &PackedWinograd) -> Schedule {
    let tiles = g.out_w.div_ceil(TILE) * g.out_h.div_ceil(TILE);
    let coutp: usize = w.groups.iter().map(|gr| gr.nv * LANES).sum();
    let v_floats = POS * tiles.next_multiple_of(PIXEL_ALIGN) * g.cin.next_multiple_of(LANES);
    if tiles <= coutp && v_floats <= BY_POSITION_MAX_V_FLOATS {
        Schedule::ByPosition
    } else {
        Schedule::TileBlocks
    }
}

/// `y = act(conv3x3(x, w) + bias)` [+ residual], stride 1, any padding; the same contract
/// as `conv2d_nhwc_isa`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn winograd_conv3x3_nhwc_isa(
    isa: Isa,
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    winograd(
        isa,
        None,
        x,
        InputLayout::Plain,
        g,
        w,
        bias,
        act,
        residual,
        y,
    )
}

/// [`winograd_conv3x3_nhwc_isa`] with the schedule forced (`None`: picked by shape).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn winograd_conv3x3_scheduled(
    isa: Isa,
    schedule: Option<Schedule>,
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    winograd(
        isa,
        schedule,
        x,
        InputLayout::Plain,
        g,
        w,
        bias,
        act,
        residual,
        y,
    )
}

/// The decoder's conv input `u * (channel_gate[c] + spatial_gate[p])` (its first scSE),
/// where `u` is the concat of the 2x upsampled half-resolution map (`x_channels` channels,
/// a multiple of 16) and `skip` (the other channels, full resolution): read in place.
#[derive(Clone, Copy)]
pub(crate) struct GatedConcat<'a> {
    pub skip: &'a [f32],
    pub x_channels: usize,
    /// One per input channel.
    pub channel_gate: &'a [f32],
    /// One per full-resolution input pixel.
    pub spatial_gate: &'a [f32],
}

/// How `x` holds the conv's input.
#[derive(Clone, Copy)]
enum InputLayout<'a> {
    /// The input itself.
    Plain,
    /// The input at half resolution, read as its nearest-neighbour 2x upsampling (the
    /// decoder's upsample folded into the conv: the big map is never written).
    Upsampled,
    /// The first channels upsampled as above; the rest and the gates in [`GatedConcat`].
    GatedConcat(GatedConcat<'a>),
}

impl InputLayout<'_> {
    /// Asserts that `x` and the layout's other parts fit the geometry.
    fn check(&self, x: &[f32], g: &ConvGeometry) {
        if let InputLayout::Plain = self {
            assert_eq!(x.len(), g.input_len(), "conv input length");
            return;
        }
        assert!(
            g.in_h.is_multiple_of(2) && g.in_w.is_multiple_of(2),
            "an upsampled input has even sides"
        );
        let pixels = g.in_h * g.in_w;
        let upsampled_channels = match self {
            InputLayout::GatedConcat(cat) => {
                let ca = cat.x_channels;
                assert!(ca.is_multiple_of(LANES) && ca <= g.cin, "concat split");
                assert_eq!(cat.skip.len(), pixels * (g.cin - ca), "skip length");
                assert_eq!(cat.channel_gate.len(), g.cin, "channel gate length");
                assert_eq!(cat.spatial_gate.len(), pixels, "spatial gate length");
                ca
            }
            _ => g.cin,
        };
        assert_eq!(
            x.len(),
            pixels / 4 * upsampled_channels,
            "conv input length"
        );
    }
}

/// [`winograd_conv3x3_nhwc_isa`] on a [`GatedConcat`] input whose first channels are the
/// 2x upsampling of `x_half` (`g` describes the full input), without materializing it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn winograd_conv3x3_gated_concat_nhwc_isa(
    isa: Isa,
    x_half: &[f32],
    concat: GatedConcat<'_>,
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    y: &mut [f32],
) {
    let layout = InputLayout::GatedConcat(concat);
    winograd(isa, None, x_half, layout, g, w, bias, act, None, y)
}

/// The same on the nearest-neighbour 2x upsampling of `x_half` (`g` describes the
/// upsampled input: even `in_h` and `in_w`), without materializing it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn winograd_conv3x3_upsampled_nhwc_isa(
    isa: Isa,
    x_half: &[f32],
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    let layout = InputLayout::Upsampled;
    winograd(isa, None, x_half, layout, g, w, bias, act, residual, y)
}

#[allow(clippy::too_many_arguments)]
fn winograd(
    isa: Isa,
    schedule: Option<Schedule>,
    x: &[f32],
    layout: InputLayout<'_>,
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    assert!(
        g.kernel == 3 && g.stride == 1,
        "Winograd F(4x4, 3x3) needs a stride-1 3x3 convolution"
    );
    assert_eq!(
        (w.cin, w.cout),
        (g.cin, g.cout),
        "packed weights do not match the geometry"
    );
    layout.check(x, g);
    assert_eq!(y.len(), g.output_len(), "conv output length");
    assert_eq!(bias.len(), g.cout, "conv bias length");
    if let Some(r) = residual {
        assert_eq!(r.len(), y.len(), "conv residual length");
    }
    if g.out_h * g.out_w == 0 {
        return;
    }
    let zeros = vec![0.0; g.cin + LANES];
    let mut padded_bias = vec![0.0; g.cout.next_multiple_of(LANES)];
    padded_bias[..g.cout].copy_from_slice(bias);
    let plan = plan(g, w, rayon::current_num_threads());
    let schedule = schedule.unwrap_or_else(|| schedule_for(g, w));
    let job = WinoJob {
        x,
        layout,
        g: *g,
        w,
        bias: &padded_bias,
        act,
        residual,
        y: OutPtr(y.as_mut_ptr()),
        zeros: &zeros,
        plan: &plan,
    };
    match schedule {
        Schedule::TileBlocks => for_each_unit(plan.parallel, &plan.units, |unit| {
            wino_unit_isa(isa, &job, unit)
        }),
        Schedule::ByPosition => by_position(isa, &job),
    }
}

/// Runs `f` on every unit, on the rayon pool when `parallel`.
fn for_each_unit<T: Sync>(parallel: bool, units: &[T], f: impl Fn(&T) + Send + Sync) {
    if parallel {
        units.par_iter().for_each(f);
    } else {
        units.iter().for_each(f);
    }
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
    let v_len = POS * plan.rows * plan.kcs;
    let m_len = POS * plan.rows * unit.cols;
    // Taken out of the cell, not used inside a closure: closures are not compiled with the
    // caller's target features.
    let mut scratch = SCRATCH.with(|cell| cell.take());
    if scratch.len() < v_len + m_len {
        scratch.resize(v_len + m_len, 0.0);
    }
    let (v, m) = scratch.split_at_mut(v_len);
    // SAFETY: `winograd_conv3x3_nhwc_isa` checked the lengths; `v` and `m` hold
    // `POS * rows` rows of `kcs` and `unit.cols` floats.
    unsafe {
        let (rows, kcs) = (plan.rows, plan.kcs);
        for (ci, &(c0, c1)) in plan.chunks.iter().enumerate() {
            transform_inputs::<L>(job, unit.t0, unit.t1, c0, c1, v.as_mut_ptr(), rows, kcs);
            for pos in 0..POS {
                for group in &job.w.groups[unit.g0..unit.g1] {
                    let mp = m.as_mut_ptr();
                    let product = Product {
                        v: v.as_ptr().add(pos * rows * kcs),
                        ldv: kcs,
                        b: job.w.weights(group, pos, c0),
                        kc: c1 - c0,
                        m: mp.add(pos * rows * unit.cols + group.co0 - unit.col0),
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
            rows,
        };
        transform_outputs::<L>(job, &out, m.as_ptr());
    }
    SCRATCH.with(|cell| cell.replace(scratch));
}

thread_local! {
    /// The by-position schedule's `V` and `M`, kept by the calling thread between calls.
    static SHARED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The buffers of the by-position schedule: `V[pos][row = tile][ldv]` (all input
/// channels) and `M[pos][row = tile][coutp]`, `rows` rows per position.
struct Shared {
    v: OutPtr,
    m: OutPtr,
    tiles: usize,
    rows: usize,
    ldv: usize,
    coutp: usize,
}

/// The [`Schedule::ByPosition`] schedule: input transforms by (tile row, channel chunk),
/// products by (position, column group), output transforms by tile row.
fn by_position(isa: Isa, job: &WinoJob<'_>) {
    let (g, plan) = (&job.g, job.plan);
    let tiles_h = g.out_h.div_ceil(TILE);
    let tiles = plan.tiles_w * tiles_h;
    let rows = tiles.next_multiple_of(PIXEL_ALIGN);
    let ldv = g.cin.next_multiple_of(LANES);
    let coutp: usize = job.w.groups.iter().map(|gr| gr.nv * LANES).sum();
    let (v_len, m_len) = (POS * rows * ldv, POS * rows * coutp);
    let mut buf = SHARED.with(|cell| cell.take());
    if buf.len() < v_len + m_len {
        buf.resize(v_len + m_len, 0.0);
    }
    let (v, m) = buf.split_at_mut(v_len);
    let shared = Shared {
        v: OutPtr(v.as_mut_ptr()),
        m: OutPtr(m.as_mut_ptr()),
        tiles,
        rows,
        ldv,
        coutp,
    };
    let inputs: Vec<(usize, usize)> = (0..tiles_h)
        .flat_map(|ty| (0..plan.chunks.len()).map(move |ci| (ty, ci)))
        .collect();
    for_each_unit(plan.parallel, &inputs, |&(ty, ci)| {
        by_position_inputs_isa(isa, job, &shared, ty, ci)
    });
    let products: Vec<(usize, usize)> = (0..POS)
        .flat_map(|pos| (0..job.w.groups.len()).map(move |gi| (pos, gi)))
        .collect();
    for_each_unit(plan.parallel, &products, |&(pos, gi)| {
        by_position_products_isa(isa, job, &shared, pos, gi)
    });
    let outputs: Vec<usize> = (0..tiles_h).collect();
    for_each_unit(plan.parallel, &outputs, |&ty| {
        by_position_outputs_isa(isa, job, &shared, ty)
    });
    SHARED.with(|cell| cell.replace(buf));
}

dispatch_isa! {
    fn by_position_inputs_isa(job: &WinoJob<'_>, s: &Shared, ty: usize, ci: usize) => by_position_inputs;
}

dispatch_isa! {
    fn by_position_products_isa(job: &WinoJob<'_>, s: &Shared, pos: usize, gi: usize) => by_position_products;
}

dispatch_isa! {
    fn by_position_outputs_isa(job: &WinoJob<'_>, s: &Shared, ty: usize) => by_position_outputs;
}

/// Transform the inputs of tile row `ty`, channel chunk `ci`, into `V`.
#[inline(always)]
fn by_position_inputs<L: Level>(job: &WinoJob<'_>, s: &Shared, ty: usize, ci: usize) {
    let tiles_w = job.plan.tiles_w;
    let (c0, c1) = job.plan.chunks[ci];
    let t0 = ty * tiles_w;
    // SAFETY: `V` holds `rows >= tiles` rows of `ldv >= cin` (rounded up to 16) floats per
    // position; units write disjoint (tile, channel) ranges.
    unsafe {
        let v = s.v.0.add(t0 * s.ldv + c0);
        transform_inputs::<L>(job, t0, t0 + tiles_w, c0, c1, v, s.rows, s.ldv);
    }
}

/// `M[pos][.., group] = V[pos] x U[pos, group]`, all tiles, channel chunk by chunk.
#[inline(always)]
fn by_position_products<L: Level>(job: &WinoJob<'_>, s: &Shared, pos: usize, gi: usize) {
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
                v: s.v.0.add(pos * s.rows * s.ldv + c0),
                ldv: s.ldv,
                b: job.w.weights(group, pos, c0),
                kc: c1 - c0,
                m: s.m.0.add(pos * s.rows * s.coutp + group.co0),
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
fn by_position_outputs<L: Level>(job: &WinoJob<'_>, s: &Shared, ty: usize) {
    let t0 = ty * job.plan.tiles_w;
    let tiles = OutputTiles {
        t0,
        t1: t0 + job.plan.tiles_w,
        col0: 0,
        cols: s.coutp,
        rows: s.rows,
    };
    // SAFETY: `M` holds `POS * rows * coutp` floats; units store disjoint output pixels.
    unsafe { transform_outputs::<L>(job, &tiles, s.m.0.add(t0 * s.coutp)) }
}

/// `v[(pos * rows + t - t0) * kcs + c - c0] = (B^T d B)[pos]` for tiles `t0..t1` and
/// channels `c0..c1` (written in whole vectors of 16).
///
/// # Safety
/// `v` must be writable at those indices, rounded up to whole vectors; the job's lengths
/// must have been checked.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transform_inputs<L: Level>(
    job: &WinoJob<'_>,
    t0: usize,
    t1: usize,
    c0: usize,
    c1: usize,
    v: *mut f32,
    rows: usize,
    kcs: usize,
) {
    let g = &job.g;
    for t in t0..t1 {
        let (ty, tx) = (t / job.plan.tiles_w, t % job.plan.tiles_w);
        let iy0 = (ty * TILE) as isize - g.pad_top as isize;
        let ix0 = (tx * TILE) as isize - g.pad_left as isize;
        // Patch pixels inside the input (full-resolution index); the others read zeros.
        let mut inside = [None; POS];
        for r in 0..PATCH {
            let iy = iy0 + r as isize;
            if iy < 0 || iy as usize >= g.in_h {
                continue;
            }
            for c in 0..PATCH {
                let ix = ix0 + c as isize;
                if ix >= 0 && (ix as usize) < g.in_w {
                    inside[r * PATCH + c] = Some((iy as usize, ix as usize));
                }
            }
        }
        let dst = v.add((t - t0) * kcs);
        if let InputLayout::GatedConcat(cat) = &job.layout {
            transform_gated_concat::<L>(job, cat, &inside, c0, c1, dst, rows, kcs);
            continue;
        }
        let mut src = [job.zeros.as_ptr(); POS];
        for (s, &at) in src.iter_mut().zip(&inside) {
            if let Some((iy, ix)) = at {
                let pixel = if let InputLayout::Upsampled = job.layout {
                    (iy / 2) * (g.in_w / 2) + ix / 2
                } else {
                    iy * g.in_w + ix
                };
                *s = job.x.as_ptr().add(pixel * g.cin);
            }
        }
        let mut c = c0;
        while c < c1 {
            let mut d = [L::zero(); POS];
            if c + LANES <= g.cin {
                for i in 0..POS {
                    d[i] = L::load(src[i].add(c));
                }
            } else {
                let n = g.cin - c;
                for i in 0..POS {
                    d[i] = load_partial::<L>(std::slice::from_raw_parts(src[i].add(c), n));
                }
            }
            let out = input_tile::<L>(&d);
            for pos in 0..POS {
                L::store(dst.add(pos * rows * kcs + (c - c0)), out[pos]);
            }
            c += LANES;
        }
    }
}

/// `transform_inputs` for one tile of a [`GatedConcat`] input: each loaded vector of
/// channels is scaled by its gates (the scSE the conv reads through).
///
/// # Safety
/// As `transform_inputs`; `dst` is the tile's first row of `v`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transform_gated_concat<L: Level>(
    job: &WinoJob<'_>,
    cat: &GatedConcat<'_>,
    inside: &[Option<(usize, usize)>; POS],
    c0: usize,
    c1: usize,
    dst: *mut f32,
    rows: usize,
    kcs: usize,
) {
    let g = &job.g;
    let (ca, cs) = (cat.x_channels, g.cin - cat.x_channels);
    let mut up = [job.zeros.as_ptr(); POS];
    let mut skip = [job.zeros.as_ptr(); POS];
    let mut spatial = [L::zero(); POS];
    for i in 0..POS {
        if let Some((iy, ix)) = inside[i] {
            let pixel = iy * g.in_w + ix;
            up[i] = job.x.as_ptr().add(((iy / 2) * (g.in_w / 2) + ix / 2) * ca);
            skip[i] = cat.skip.as_ptr().add(pixel * cs);
            spatial[i] = L::splat(cat.spatial_gate[pixel]);
        }
    }
    let mut c = c0;
    while c < c1 {
        let mut d = [L::zero(); POS];
        // `ca` is a multiple of 16: a vector never straddles the two parts.
        let lanes = LANES.min(g.cin - c);
        let channel = load_partial::<L>(&cat.channel_gate[c..c + lanes]);
        for i in 0..POS {
            let x = if c < ca {
                L::load(up[i].add(c))
            } else if lanes == LANES {
                L::load(skip[i].add(c - ca))
            } else {
                load_partial::<L>(std::slice::from_raw_parts(skip[i].add(c - ca), lanes))
            };
            d[i] = L::mul(x, L::add(channel, spatial[i]));
        }
        let out = input_tile::<L>(&d);
        for pos in 0..POS {
            L::store(dst.add(pos * rows * kcs + (c - c0)), out[pos]);
        }
        c += LANES;
    }
}

/// One GEMM of a position and a column group: `m[r] (+)= v[r] x b` for rows `r < nt`.
struct Product {
    /// Row `r` of the transformed inputs at `v + r * ldv`, `kc` floats.
    v: *const f32,
    ldv: usize,
    /// Packed transformed weights, `kc` rows of `NV * 16` floats.
    b: *const f32,
    kc: usize,
    /// Row `r` of the products at `m + r * ldm`, `NV * 16` floats.
    m: *mut f32,
    ldm: usize,
    nt: usize,
    /// Add the products already in `m` (earlier channel chunks).
    add_earlier: bool,
    /// Weights to prefetch while the first row tiles run (the next product's, when they
    /// stream from memory: read once per call).
    next: Option<*const f32>,
}

/// Computes a [`Product`], `MR` rows at a time.
///
/// # Safety
/// The pointers of `p` must be valid for `nt` rounded up to `MR` rows (rows past `nt`
/// compute unused products).
#[inline(always)]
unsafe fn multiply_rows<L: Level, const MR: usize, const NV: usize>(p: &Product) {
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

/// Tiles `t0..t1` and output channels `col0..col0 + cols` of a products buffer laid out
/// `[pos][rows][cols]` (tile `t` in row `t - t0`).
struct OutputTiles {
    t0: usize,
    t1: usize,
    col0: usize,
    cols: usize,
    rows: usize,
}

/// Output transform, bias, activation, residual and store of some tiles.
///
/// # Safety
/// `m` must hold `POS * unit.rows * unit.cols` floats; the job's lengths must have been
/// checked.
#[inline(always)]
unsafe fn transform_outputs<L: Level>(job: &WinoJob<'_>, unit: &OutputTiles, m: *const f32) {
    let g = &job.g;
    let rows = unit.rows;
    let cout = g.cout;
    for t in unit.t0..unit.t1 {
        let (ty, tx) = (t / job.plan.tiles_w, t % job.plan.tiles_w);
        let (oy0, ox0) = (ty * TILE, tx * TILE);
        let (hv, wv) = ((g.out_h - oy0).min(TILE), (g.out_w - ox0).min(TILE));
        let mut col = 0;
        while col < unit.cols && unit.col0 + col < cout {
            let co = unit.col0 + col;
            let lanes = LANES.min(cout - co);
            let mut mm = [L::zero(); POS];
            for pos in 0..POS {
                mm[pos] = L::load(m.add((pos * rows + t - unit.t0) * unit.cols + col));
            }
            let out = output_tile::<L>(&mm);
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
