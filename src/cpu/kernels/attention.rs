//! Channel attention: EfficientNet squeeze-excite and the decoder's scSE.
//!
//! Both are two passes over the tensor: a per-channel mean (parallel over pixel chunks,
//! partial sums of at most [`SUM_ROWS`] pixels in f32 then combined in f64), a tiny
//! matrix-vector gate, then a per-pixel pass that scales (parallel over pixel chunks).
//!
//! Squeeze-excite on small maps (at most [`SUM_ROWS`] pixels: 16x16 and 8x8 with 672-2688
//! channels) splits by channel blocks instead, so that the two fully connected layers (up
//! to 2688 x 112 weights each, read from L3) are split too, in two parallel steps: (1) each
//! block's means and its share of the reduce layer's dot products; (2) each block's gates
//! (its rows of the expand layer) and the scaling of its channels in every pixel.

#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::isa::{dispatch_isa, Isa};
use super::simd::{activate, load_partial, sigmoid, store_partial, Level, LANES};
use super::{Activation, Scse, SqueezeExcite};

/// Pixels summed in f32 before the sum joins the f64 total.
const SUM_ROWS: usize = 256;
/// Pixel chunks of a channel mean (summed apart, then joined in order).
const MEAN_CHUNKS: usize = 8;
/// Elements below which a pass runs on the calling thread.
const SERIAL_ELEMENTS: usize = 1 << 16;

pub(crate) fn squeeze_excite_nhwc_isa(
    isa: Isa,
    x: &[f32],
    pixels: usize,
    se: &SqueezeExcite,
    y: &mut [f32],
) {
    let (c, sq) = (se.channels, se.squeeze);
    assert_eq!(x.len(), pixels * c, "squeeze-excite input length");
    assert_eq!(y.len(), x.len(), "squeeze-excite output length");
    assert_eq!(
        se.reduce_w.len(),
        sq * c,
        "squeeze-excite reduce weight length"
    );
    assert_eq!(se.reduce_b.len(), sq, "squeeze-excite reduce bias length");
    assert_eq!(
        se.expand_w.len(),
        c * sq,
        "squeeze-excite expand weight length"
    );
    assert_eq!(se.expand_b.len(), c, "squeeze-excite expand bias length");
    if pixels == 0 || c == 0 {
        return;
    }
    if pixels <= SUM_ROWS && sq > 0 {
        squeeze_excite_by_channels(isa, x, pixels, se, y);
        return;
    }
    let mut gate = vec![0.0; c];
    squeeze_excite_gates_isa(isa, x, pixels, se, &mut gate);
    for_pixel_chunks(x, y, c, |xs, ys| scale_channels_isa(isa, xs, &gate, ys));
}

/// Whether [`squeeze_excite_gates_isa`] takes a map of `pixels` pixels.
pub(crate) fn gates_alone_apply(pixels: usize) -> bool {
    pixels > SUM_ROWS
}

/// The channel gates of a squeeze-excite over more than [`SUM_ROWS`] pixels, the same as
/// [`squeeze_excite_nhwc_isa`] computes them, for a reader that scales its input itself.
pub(crate) fn squeeze_excite_gates_isa(
    isa: Isa,
    x: &[f32],
    pixels: usize,
    se: &SqueezeExcite,
    gate: &mut [f32],
) {
    let (c, sq) = (se.channels, se.squeeze);
    assert!(
        pixels > SUM_ROWS,
        "gates alone only for maps of more than {SUM_ROWS} pixels"
    );
    assert_eq!(x.len(), pixels * c, "squeeze-excite input length");
    assert_eq!(gate.len(), c, "squeeze-excite gate length");
    let means = channel_means(isa, x, pixels, c);
    let mut squeezed = vec![0.0; sq];
    matvec_isa(
        isa,
        &se.reduce_w,
        &se.reduce_b,
        &means,
        Activation::Swish,
        &mut squeezed,
    );
    matvec_isa(
        isa,
        &se.expand_w,
        &se.expand_b,
        &squeezed,
        Activation::Sigmoid,
        gate,
    );
}

/// Channels `c0 .. c0 + len` of every pixel of an NHWC output, for the one channel block
/// that writes them.
struct BlockRows {
    ptr: *mut f32,
    stride: usize,
    len: usize,
    pixels: usize,
}

// SAFETY: a `BlockRows` is the only access to its segments (see `new`), wherever it goes.
unsafe impl Send for BlockRows {}

impl BlockRows {
    /// # Safety
    /// `y` must be valid for `(pixels - 1) * stride + c0 + len` floats, and while this value
    /// lives nothing else may access the segments `p * stride + c0 .. + len`.
    unsafe fn new(y: *mut f32, stride: usize, c0: usize, len: usize, pixels: usize) -> Self {
        BlockRows {
            ptr: y.add(c0),
            stride,
            len,
            pixels,
        }
    }

    fn row(&mut self, p: usize) -> &mut [f32] {
        assert!(p < self.pixels);
        // SAFETY: in bounds and exclusive (`new`); `&mut self` keeps one row out at a time.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(p * self.stride), self.len) }
    }
}

/// The output pointer, shared so that each block can build its own [`BlockRows`].
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used to build `BlockRows` of disjoint channel ranges.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A method, not `.0`: closures would capture the bare (not `Sync`) field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Channel blocks of the small-map squeeze-excite: a fixed count, not one per thread, so
/// that the reduce layer's block sums (and so the values) do not depend on the machine's
/// thread count.
const SE_BLOCKS: usize = 8;
/// Smallest channel block worth a task of its own in the small-map squeeze-excite.
const MIN_BLOCK_CHANNELS: usize = 64;

/// Squeeze-excite with at most [`SUM_ROWS`] pixels, by channel blocks (see the module doc).
fn squeeze_excite_by_channels(
    isa: Isa,
    x: &[f32],
    pixels: usize,
    se: &SqueezeExcite,
    y: &mut [f32],
) {
    let c = se.channels;
    let threads = rayon::current_num_threads();
    let block = c
        .div_ceil(SE_BLOCKS)
        .next_multiple_of(LANES)
        .max(MIN_BLOCK_CHANNELS);
    let blocks: Vec<(usize, usize)> = (0..c)
        .step_by(block)
        .map(|c0| (c0, (c0 + block).min(c)))
        .collect();
    // Work in floats touched: the map read twice and written once, plus both FC layers.
    let parallel =
        threads > 1 && blocks.len() > 1 && 3 * x.len() + 2 * c * se.squeeze >= SERIAL_ELEMENTS;
    // Step 1: each block's share of the reduce layer's dot products, summed in block order.
    let reduce_part = |&(c0, c1): &(usize, usize)| {
        let mut part = vec![0.0; se.squeeze];
        se_reduce_block_isa(isa, x, pixels, se, c0, c1, &mut part);
        part
    };
    let parts: Vec<Vec<f32>> = if parallel {
        blocks.par_iter().map(reduce_part).collect()
    } else {
        blocks.iter().map(reduce_part).collect()
    };
    let mut squeezed = se.reduce_b.clone();
    for part in &parts {
        squeezed.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    activate_slice_isa(isa, Activation::Swish, &mut squeezed);
    // Step 2: each block's gates, then its channels of every pixel scaled.
    let out = SharedOut(y.as_mut_ptr());
    let excite = |&(c0, c1): &(usize, usize)| {
        // SAFETY: `y` holds pixels * c floats and this block alone writes channels c0..c1.
        let mut rows = unsafe { BlockRows::new(out.ptr(), c, c0, c1 - c0, pixels) };
        se_excite_block_isa(isa, x, se, &squeezed, c0, &mut rows);
    };
    if parallel {
        blocks.par_iter().for_each(excite);
    } else {
        blocks.iter().for_each(excite);
    }
}

dispatch_isa! {
    fn se_reduce_block_isa(x: &[f32], pixels: usize, se: &SqueezeExcite, c0: usize, c1: usize, part: &mut [f32]) => se_reduce_block;
}

/// `part[r] = sum over c in c0..c1 of reduce_w[r, c] * mean_c` (`pixels <= SUM_ROWS`: the
/// means are one f32 sum per channel, divided in f64 as in [`channel_means`]).
#[inline(always)]
fn se_reduce_block<L: Level>(
    x: &[f32],
    pixels: usize,
    se: &SqueezeExcite,
    c0: usize,
    c1: usize,
    part: &mut [f32],
) {
    let c = se.channels;
    let mut means = vec![0.0; c1 - c0];
    sum_rows::<L>(&x[c0..], c, pixels, &mut means);
    for m in &mut means {
        *m = (*m as f64 / pixels as f64) as f32;
    }
    let rows = |r: usize| &se.reduce_w[r * c + c0..r * c + c1];
    let mut r = 0;
    while r + 4 <= part.len() {
        let sums = dot_rows::<L, 4>([rows(r), rows(r + 1), rows(r + 2), rows(r + 3)], &means);
        part[r..r + 4].copy_from_slice(&sums);
        r += 4;
    }
    for r in r..part.len() {
        part[r] = dot_rows::<L, 1>([rows(r)], &means)[0];
    }
}

dispatch_isa! {
    fn se_excite_block_isa(x: &[f32], se: &SqueezeExcite, squeezed: &[f32], c0: usize, out: &mut BlockRows) => se_excite_block;
}

/// The block of squeeze-excite's second step that owns channels `c0 .. c0 + out.len`: its
/// gates from the expand layer, then `y[p, c] = x[p, c] * gate[c]` in every pixel.
#[inline(always)]
fn se_excite_block<L: Level>(
    x: &[f32],
    se: &SqueezeExcite,
    squeezed: &[f32],
    c0: usize,
    out: &mut BlockRows,
) {
    let (c, sq, len) = (se.channels, se.squeeze, out.len);
    let mut gate = vec![0.0; len];
    matvec::<L>(
        &se.expand_w[c0 * sq..(c0 + len) * sq],
        &se.expand_b[c0..c0 + len],
        squeezed,
        Activation::Sigmoid,
        &mut gate,
    );
    for p in 0..out.pixels {
        scale_row::<L>(&x[p * c + c0..][..len], &gate, 0.0, out.row(p));
    }
}

pub(crate) fn scse_nhwc_isa(isa: Isa, x: &[f32], pixels: usize, w: &Scse, y: &mut [f32]) {
    let (c, hidden) = (w.channels, w.hidden);
    assert_eq!(x.len(), pixels * c, "scSE input length");
    assert_eq!(y.len(), x.len(), "scSE output length");
    assert_eq!(w.cse1_w.len(), hidden * c, "scSE cSE.1 weight length");
    assert_eq!(w.cse1_b.len(), hidden, "scSE cSE.1 bias length");
    assert_eq!(w.cse3_w.len(), c * hidden, "scSE cSE.3 weight length");
    assert_eq!(w.cse3_b.len(), c, "scSE cSE.3 bias length");
    assert_eq!(w.sse_w.len(), c, "scSE sSE weight length");
    if pixels == 0 || c == 0 {
        return;
    }
    let means = channel_means(isa, x, pixels, c);
    let mut z = vec![0.0; hidden];
    matvec_isa(isa, &w.cse1_w, &w.cse1_b, &means, Activation::Relu, &mut z);
    let mut channel_gate = vec![0.0; c];
    matvec_isa(
        isa,
        &w.cse3_w,
        &w.cse3_b,
        &z,
        Activation::Sigmoid,
        &mut channel_gate,
    );
    let spatial = (w.sse_w.as_slice(), w.sse_b);
    for_pixel_chunks(x, y, c, |xs, ys| {
        scse_pixels_isa(isa, xs, &channel_gate, spatial, ys)
    });
}

/// Run `f` over matching chunks of whole pixels of `x` and `y`, in parallel when large.
fn for_pixel_chunks(x: &[f32], y: &mut [f32], c: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || x.len() < SERIAL_ELEMENTS {
        f(x, y);
        return;
    }
    let pixels = x.len() / c;
    let chunk = pixels.div_ceil(4 * threads) * c;
    x.par_chunks(chunk)
        .zip(y.par_chunks_mut(chunk))
        .for_each(|(xs, ys)| f(xs, ys));
}

/// Per-channel mean over `pixels` rows of `c` channels.
fn channel_means(isa: Isa, x: &[f32], pixels: usize, c: usize) -> Vec<f32> {
    let threads = rayon::current_num_threads();
    let sum_chunk = |xs: &[f32]| {
        let mut total = vec![0.0f64; c];
        let mut part = vec![0.0f32; c];
        for rows in xs.chunks(SUM_ROWS * c) {
            sum_rows_isa(isa, rows, c, rows.len() / c, &mut part);
            for (t, &p) in total.iter_mut().zip(&part) {
                *t += p as f64;
            }
        }
        total
    };
    // Chunks by shape alone, joined in order: the same sums on any number of threads.
    // (At least 1: an empty map gives no chunks, not a zero-length chunk size.)
    let chunk = (pixels.div_ceil(MEAN_CHUNKS).next_multiple_of(SUM_ROWS) * c).max(1);
    let parts: Vec<Vec<f64>> = if threads <= 1 || x.len() < SERIAL_ELEMENTS {
        x.chunks(chunk).map(sum_chunk).collect()
    } else {
        x.par_chunks(chunk).map(sum_chunk).collect()
    };
    let mut totals = vec![0.0f64; c];
    for part in &parts {
        totals.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    totals.iter().map(|&s| (s / pixels as f64) as f32).collect()
}

dispatch_isa! {
    fn sum_rows_isa(rows: &[f32], stride: usize, pixels: usize, sums: &mut [f32]) => sum_rows;
}

/// `sums[c] = sum over p < pixels of rows[p * stride + c]` (`sums.len() <= stride`).
#[inline(always)]
fn sum_rows<L: Level>(rows: &[f32], stride: usize, pixels: usize, sums: &mut [f32]) {
    let c = sums.len();
    assert!(c <= stride && (pixels == 0 || (pixels - 1) * stride + c <= rows.len()));
    let mut c0 = 0;
    while c0 + 4 * LANES <= c {
        let mut acc = [L::zero(); 4];
        for p in 0..pixels {
            let row = &rows[p * stride + c0..][..4 * LANES];
            for (v, a) in acc.iter_mut().enumerate() {
                // SAFETY: `row` holds 4 vectors.
                *a = L::add(*a, unsafe { L::load(row.as_ptr().add(v * LANES)) });
            }
        }
        for (v, a) in acc.iter().enumerate() {
            // SAFETY: `sums` holds c >= c0 + 64 floats.
            unsafe { L::store(sums.as_mut_ptr().add(c0 + v * LANES), *a) };
        }
        c0 += 4 * LANES;
    }
    while c0 < c {
        let lanes = LANES.min(c - c0);
        let mut acc = L::zero();
        for p in 0..pixels {
            acc = L::add(acc, load_partial::<L>(&rows[p * stride + c0..][..lanes]));
        }
        store_partial::<L>(&mut sums[c0..c0 + lanes], acc);
        c0 += lanes;
    }
}

dispatch_isa! {
    fn matvec_isa(w: &[f32], b: &[f32], x: &[f32], act: Activation, out: &mut [f32]) => matvec;
}

/// `out[r] = act(w[r, ..] · x + b[r])`, `w` row-major `out.len() x x.len()`.
#[inline(always)]
fn matvec<L: Level>(w: &[f32], b: &[f32], x: &[f32], act: Activation, out: &mut [f32]) {
    let cols = x.len();
    if cols >= LANES {
        // Four rows at a time: four independent FMA chains sharing the loads of `x`.
        let done = out.len() / 4 * 4;
        let mut quads = out.chunks_exact_mut(4);
        for (q, outs) in (&mut quads).enumerate() {
            let rows = [0, 1, 2, 3].map(|i| &w[(4 * q + i) * cols..][..cols]);
            let sums = dot_rows::<L, 4>(rows, x);
            for (i, o) in outs.iter_mut().enumerate() {
                *o = sums[i] + b[4 * q + i];
            }
        }
        for (i, o) in quads.into_remainder().iter_mut().enumerate() {
            let r = done + i;
            *o = dot_rows::<L, 1>([&w[r * cols..][..cols]], x)[0] + b[r];
        }
    } else {
        // Short rows (a squeeze of a few channels): plain scalar sums.
        for (r, o) in out.iter_mut().enumerate() {
            *o = w[r * cols..][..cols]
                .iter()
                .zip(x)
                .fold(b[r], |acc, (&wv, &xv)| acc + wv * xv);
        }
    }
    activate_slice::<L>(act, out);
}

dispatch_isa! {
    fn activate_slice_isa(act: Activation, xs: &mut [f32]) => activate_slice;
}

/// The activation in place, 16 values at a time (not one exponential per value).
#[inline(always)]
fn activate_slice<L: Level>(act: Activation, xs: &mut [f32]) {
    for chunk in xs.chunks_mut(LANES) {
        let v = activate::<L>(act, load_partial::<L>(chunk));
        store_partial::<L>(chunk, v);
    }
}

/// Dot products of `R` rows with `x` (all the same length).
#[inline(always)]
fn dot_rows<L: Level, const R: usize>(rows: [&[f32]; R], x: &[f32]) -> [f32; R] {
    let n = x.len();
    let full = n / LANES * LANES;
    let mut acc = [L::zero(); R];
    for c in (0..full).step_by(LANES) {
        // SAFETY: c + 16 <= n and every row has n floats.
        unsafe {
            let xv = L::load(x.as_ptr().add(c));
            for i in 0..R {
                acc[i] = L::fma(L::load(rows[i].as_ptr().add(c)), xv, acc[i]);
            }
        }
    }
    if full < n {
        let xv = load_partial::<L>(&x[full..]);
        for i in 0..R {
            acc[i] = L::fma(load_partial::<L>(&rows[i][full..]), xv, acc[i]);
        }
    }
    acc.map(L::reduce_add)
}

/// Vectorized dot product of two equal-length slices.
#[inline(always)]
fn dot<L: Level>(a: &[f32], b: &[f32]) -> f32 {
    dot_rows::<L, 1>([a], b)[0]
}

dispatch_isa! {
    pub(super) fn scale_channels_isa(x: &[f32], gate: &[f32], y: &mut [f32]) => scale_channels;
}

/// `y[p, c] = x[p, c] * gate[c]`.
#[inline(always)]
fn scale_channels<L: Level>(x: &[f32], gate: &[f32], y: &mut [f32]) {
    let c = gate.len();
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        scale_row::<L>(xr, gate, 0.0, yr);
    }
}

/// `y[c] = x[c] * (gate[c] + extra)`.
#[inline(always)]
fn scale_row<L: Level>(x: &[f32], gate: &[f32], extra: f32, y: &mut [f32]) {
    let extra_v = L::splat(extra);
    let mut xs = x.chunks_exact(LANES);
    let mut gs = gate.chunks_exact(LANES);
    let mut ys = y.chunks_exact_mut(LANES);
    for ((xc, gc), yc) in (&mut xs).zip(&mut gs).zip(&mut ys) {
        // SAFETY: every chunk holds exactly 16 floats.
        unsafe {
            let v = L::mul(L::load(xc.as_ptr()), L::add(L::load(gc.as_ptr()), extra_v));
            L::store(yc.as_mut_ptr(), v);
        }
    }
    let (xt, gt, yt) = (xs.remainder(), gs.remainder(), ys.into_remainder());
    if !yt.is_empty() {
        let v = L::mul(
            load_partial::<L>(xt),
            L::add(load_partial::<L>(gt), extra_v),
        );
        store_partial::<L>(yt, v);
    }
}

dispatch_isa! {
    fn scse_pixels_isa(x: &[f32], channel_gate: &[f32], spatial: (&[f32], f32), y: &mut [f32])
        => scse_pixels;
}

/// `y[p] = x[p] * (channel_gate + sigmoid(ws · x[p] + bs))` for every pixel `p`.
#[inline(always)]
fn scse_pixels<L: Level>(x: &[f32], channel_gate: &[f32], spatial: (&[f32], f32), y: &mut [f32]) {
    let c = channel_gate.len();
    let (ws, bs) = spatial;
    // 16 pixels at a time, so that one vector sigmoid serves 16 spatial gates.
    for (xs, ys) in x.chunks(LANES * c).zip(y.chunks_mut(LANES * c)) {
        let mut logits = [0.0; LANES];
        for (logit, xr) in logits.iter_mut().zip(xs.chunks_exact(c)) {
            *logit = dot::<L>(ws, xr) + bs;
        }
        // SAFETY: `logits` holds 16 floats.
        let gates = L::to_array(sigmoid::<L>(unsafe { L::load(logits.as_ptr()) }));
        for ((xr, yr), &s) in xs.chunks_exact(c).zip(ys.chunks_exact_mut(c)).zip(&gates) {
            scale_row::<L>(xr, channel_gate, s, yr);
        }
    }
}

/// The gates of an scSE whose input is the decoder's concat of `x_half` (a `h x w x ca`
/// map, 2x nearest upsampled) and `skip` (`2h x 2w x cs`), without materializing it: the
/// channel gate (`ca + cs` values) and the spatial gate (`4 h w` values). The upsampled
/// part's channel means are those of `x_half` (each pixel repeated four times) and its
/// share of a pixel's spatial logit is computed once per half-resolution pixel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scse_gates_upsampled_concat_isa(
    isa: Isa,
    x_half: &[f32],
    (h, w, ca): (usize, usize, usize),
    skip: &[f32],
    scse: &Scse,
    channel_gate: &mut [f32],
    spatial_gate: &mut [f32],
) {
    let c = scse.channels;
    let cs = c - ca;
    let (pixels, ow) = (4 * h * w, 2 * w);
    assert!(ca <= c && x_half.len() == h * w * ca && skip.len() == pixels * cs);
    assert!(channel_gate.len() == c && spatial_gate.len() == pixels);
    if pixels == 0 {
        return;
    }
    let mut means = channel_means(isa, x_half, h * w, ca);
    if cs > 0 {
        means.extend(channel_means(isa, skip, pixels, cs));
    }
    let mut z = vec![0.0; scse.hidden];
    matvec_isa(
        isa,
        &scse.cse1_w,
        &scse.cse1_b,
        &means,
        Activation::Relu,
        &mut z,
    );
    matvec_isa(
        isa,
        &scse.cse3_w,
        &scse.cse3_b,
        &z,
        Activation::Sigmoid,
        channel_gate,
    );
    let (ws_up, ws_skip) = scse.sse_w.split_at(ca);
    let mut half_logits = vec![0.0; h * w];
    matvec_rows_isa(isa, x_half, ws_up, &mut half_logits);
    let gate_row = |oy: usize, row: &mut [f32]| {
        let skip_rows = &skip[oy * ow * cs..][..ow * cs];
        matvec_rows_isa(isa, skip_rows, ws_skip, row);
        for (ox, g) in row.iter_mut().enumerate() {
            *g += half_logits[(oy / 2) * w + ox / 2] + scse.sse_b;
        }
        activate_slice_isa(isa, Activation::Sigmoid, row);
    };
    if rayon::current_num_threads() <= 1 || pixels * c < SERIAL_ELEMENTS {
        spatial_gate
            .chunks_mut(ow)
            .enumerate()
            .for_each(|(oy, row)| gate_row(oy, row));
    } else {
        spatial_gate
            .par_chunks_mut(ow)
            .enumerate()
            .for_each(|(oy, row)| gate_row(oy, row));
    }
}

dispatch_isa! {
    fn matvec_rows_isa(rows: &[f32], x: &[f32], out: &mut [f32]) => matvec_rows;
}

/// `out[p] = rows[p, ..] · x` for `out.len()` rows of `x.len()` floats (0 for empty rows).
#[inline(always)]
fn matvec_rows<L: Level>(rows: &[f32], x: &[f32], out: &mut [f32]) {
    let n = x.len();
    if n == 0 {
        out.fill(0.0);
        return;
    }
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(n)) {
        *o = dot::<L>(row, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel means join their chunks' f64 sums left to right on any thread count. The
    /// chunk sums 1, 1, 2^60, -2^60 make the order show: left to right gives 0 (the 2 is
    /// lost next to 2^60), a tree join ((1 + 1) + (2^60 - 2^60)) gives 2.
    #[test]
    fn channel_means_join_in_order_on_any_thread_count() {
        let (pixels, c) = (8 * SUM_ROWS, 32);
        let mut x = vec![0.0f32; pixels * c];
        let per_pixel = [
            1.0 / SUM_ROWS as f32,
            1.0 / SUM_ROWS as f32,
            2f32.powi(52),
            -2f32.powi(52),
        ];
        for (chunk, &v) in per_pixel.iter().enumerate() {
            x[chunk * SUM_ROWS * c..(chunk + 1) * SUM_ROWS * c].fill(v);
        }
        assert!(
            x.len() >= SERIAL_ELEMENTS,
            "large enough for the parallel path"
        );
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let means = pool.install(|| channel_means(Isa::detected(), &x, pixels, c));
            assert!(
                means.iter().all(|&m| m == 0.0),
                "{threads} threads: {:?}",
                &means[..4]
            );
        }
    }
}
