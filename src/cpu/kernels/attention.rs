//! Channel attention: EfficientNet squeeze-excite and the decoder's scSE.
//!
//! Both are two passes over the tensor: a per-channel mean (parallel over pixel chunks,
//! partial sums of at most [`SUM_ROWS`] pixels in f32 then combined in f64), a tiny
//! matrix-vector gate, then a per-pixel pass that scales (parallel over pixel chunks).

#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::isa::{dispatch_isa, Isa};
use super::simd::{activate, load_partial, sigmoid, store_partial, Level, LANES};
use super::{Activation, Scse, SqueezeExcite};

/// Pixels summed in f32 before the sum joins the f64 total.
const SUM_ROWS: usize = 256;
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
    let mut gate = vec![0.0; c];
    matvec_isa(
        isa,
        &se.expand_w,
        &se.expand_b,
        &squeezed,
        Activation::Sigmoid,
        &mut gate,
    );
    for_pixel_chunks(x, y, c, |xs, ys| scale_channels_isa(isa, xs, &gate, ys));
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
            sum_rows_isa(isa, rows, &mut part);
            for (t, &p) in total.iter_mut().zip(&part) {
                *t += p as f64;
            }
        }
        total
    };
    let totals = if threads <= 1 || x.len() < SERIAL_ELEMENTS {
        sum_chunk(x)
    } else {
        let chunk = pixels.div_ceil(4 * threads).next_multiple_of(SUM_ROWS) * c;
        x.par_chunks(chunk).map(sum_chunk).reduce(
            || vec![0.0; c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(s, v)| *s += v);
                a
            },
        )
    };
    totals.iter().map(|&s| (s / pixels as f64) as f32).collect()
}

dispatch_isa! {
    fn sum_rows_isa(rows: &[f32], sums: &mut [f32]) => sum_rows;
}

/// `sums[c] = sum over pixels of rows[p * C + c]` with `C = sums.len()`.
#[inline(always)]
fn sum_rows<L: Level>(rows: &[f32], sums: &mut [f32]) {
    let c = sums.len();
    let pixels = rows.len() / c;
    let mut c0 = 0;
    while c0 + 4 * LANES <= c {
        let mut acc = [L::zero(); 4];
        for p in 0..pixels {
            let row = &rows[p * c + c0..][..4 * LANES];
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
            acc = L::add(acc, load_partial::<L>(&rows[p * c + c0..][..lanes]));
        }
        sums[c0..c0 + lanes].copy_from_slice(&L::to_array(acc)[..lanes]);
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
    // The activation 16 outputs at a time, not one exponential per row.
    for chunk in out.chunks_mut(LANES) {
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
    fn scale_channels_isa(x: &[f32], gate: &[f32], y: &mut [f32]) => scale_channels;
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
    for ((xv, gv), yv) in xs
        .remainder()
        .iter()
        .zip(gs.remainder())
        .zip(ys.into_remainder())
    {
        *yv = xv * (gv + extra);
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
