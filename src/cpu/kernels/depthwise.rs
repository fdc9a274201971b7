//! Depthwise convolution (groups = channels) over NHWC, vectorized across channels.
//!
//! Tasks are chunks of output rows. For k = 3 and 5 (the model's), each output row is swept
//! once per block of 16 channels with that block's k x k weight vectors held in registers;
//! other sizes accumulate 64 channels at a time over the taps. Bias and activation are fused into the
//! store; taps outside the input are skipped, never padded.

#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::isa::{dispatch_isa, Isa};
use super::simd::{activate, load_partial, store_partial, AlignedBuf, Level, LANES};
use super::{Activation, ConvGeometry};

/// Work (multiply-adds) below which a depthwise conv runs on the calling thread.
const SERIAL_MACS: usize = 1 << 18;

/// Depthwise weights, repacked as `[tap = ky * k + kx][channel]` with the channel stride
/// rounded up to 16 (zeros after `channels`), so a tap's weights load as whole vectors.
pub struct PackedDepthwise {
    channels: usize,
    kernel: usize,
    stride_c: usize,
    data: AlignedBuf,
}

impl PackedDepthwise {
    /// Pack PyTorch-layout weights `[channels][1][kernel][kernel]`.
    pub fn pack(w: &[f32], channels: usize, kernel: usize) -> Self {
        assert!(channels > 0 && kernel > 0, "empty depthwise weights");
        assert_eq!(
            w.len(),
            channels * kernel * kernel,
            "depthwise weight length"
        );
        let taps = kernel * kernel;
        let stride_c = channels.next_multiple_of(LANES);
        let mut buf = AlignedBuf::zeroed(taps * stride_c);
        let data = buf.as_mut_slice();
        for c in 0..channels {
            for tap in 0..taps {
                data[tap * stride_c + c] = w[c * taps + tap];
            }
        }
        PackedDepthwise {
            channels,
            kernel,
            stride_c,
            data: buf,
        }
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// `bias` padded with zeros to the packed channel stride.
    pub(super) fn padded_bias(&self, bias: &[f32]) -> Vec<f32> {
        let mut padded = vec![0.0; self.stride_c];
        padded[..bias.len()].copy_from_slice(bias);
        padded
    }
}

pub(super) struct DwJob<'a> {
    pub(super) x: &'a [f32],
    pub(super) g: ConvGeometry,
    pub(super) w: &'a PackedDepthwise,
    /// Bias padded to `w.stride_c`.
    pub(super) bias: &'a [f32],
    pub(super) act: Activation,
}

pub(crate) fn depthwise_conv2d_nhwc_isa(
    isa: Isa,
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedDepthwise,
    bias: &[f32],
    act: Activation,
    y: &mut [f32],
) {
    assert!(g.stride > 0, "depthwise stride must be positive");
    assert!(
        g.cin == w.channels && g.cout == w.channels && g.kernel == w.kernel,
        "depthwise weights do not match the geometry"
    );
    assert_eq!(x.len(), g.input_len(), "depthwise input length");
    assert_eq!(y.len(), g.output_len(), "depthwise output length");
    assert_eq!(bias.len(), w.channels, "depthwise bias length");
    if y.is_empty() {
        return;
    }
    let padded_bias = w.padded_bias(bias);
    let job = DwJob {
        x,
        g: *g,
        w,
        bias: &padded_bias,
        act,
    };
    let row_len = g.out_w * g.cout;
    let macs = y.len() * g.kernel * g.kernel;
    let threads = rayon::current_num_threads();
    if threads <= 1 || macs < SERIAL_MACS {
        dw_rows_isa(isa, &job, 0, y);
        return;
    }
    let rows_per_task = g.out_h.div_ceil(4 * threads);
    y.par_chunks_mut(rows_per_task * row_len)
        .enumerate()
        .for_each(|(i, rows)| dw_rows_isa(isa, &job, i * rows_per_task, rows));
}

dispatch_isa! {
    pub(super) fn dw_rows_isa(job: &DwJob<'_>, oy0: usize, out: &mut [f32]) => dw_rows;
}

/// Output rows starting at `oy0`; `out` holds whole rows.
#[inline(always)]
fn dw_rows<L: Level>(job: &DwJob<'_>, oy0: usize, out: &mut [f32]) {
    match (job.g.kernel, job.g.stride) {
        (3, 1) => dw_rows_fixed::<L, 3, 1>(job, oy0, out),
        (3, 2) => dw_rows_fixed::<L, 3, 2>(job, oy0, out),
        (5, 1) => dw_rows_fixed::<L, 5, 1>(job, oy0, out),
        (5, 2) => dw_rows_fixed::<L, 5, 2>(job, oy0, out),
        _ => dw_rows_any::<L>(job, oy0, out),
    }
}

/// Output pixels per register block in the fixed-kernel path.
const PIXELS: usize = 4;

/// The model's shapes (k = 3, 5; stride 1, 2) with the kernel size and stride known at
/// compile time: for each block of 16 channels the `K x K` weight vectors stay in registers
/// while an output row is swept, [`PIXELS`] outputs at a time in the interior (no bounds
/// checks, loads shared between neighbouring taps) and one at a time at the borders. A last
/// block of fewer than 16 channels takes the same path with masked input loads and output
/// stores (its packed weights and bias are zero-padded, so those load whole).
#[inline(always)]
fn dw_rows_fixed<L: Level, const K: usize, const S: usize>(
    job: &DwJob<'_>,
    oy0: usize,
    out: &mut [f32],
) {
    let channels = job.g.cin;
    let row_len = job.g.out_w * channels;
    let full_blocks = channels / LANES;
    let tail = channels - full_blocks * LANES;
    // Row-major order: the few input rows one output row needs stay in L1/L2 while every
    // channel block sweeps them (channel-block-major order re-streams the input from L3).
    for (r, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        for cb in 0..full_blocks {
            let c0 = cb * LANES;
            let w = block_weights::<L, K>(job.w, c0);
            dw_row_fixed::<L, K, S, false>(job, oy0 + r, c0, LANES, &w, out_row);
        }
        if tail > 0 {
            let c0 = full_blocks * LANES;
            let w = block_weights::<L, K>(job.w, c0);
            dw_row_fixed::<L, K, S, true>(job, oy0 + r, c0, tail, &w, out_row);
        }
    }
}

/// The `K x K` weight vectors of channels `c0 .. c0 + 16` (zeros past the channel count).
#[inline(always)]
fn block_weights<L: Level, const K: usize>(packed: &PackedDepthwise, c0: usize) -> [[L::V; K]; K] {
    assert!(packed.kernel == K && c0 < packed.stride_c);
    let data = packed.data.as_slice().as_ptr();
    let mut w = [[L::zero(); K]; K];
    for ky in 0..K {
        for kx in 0..K {
            let tap = (ky * K + kx) * packed.stride_c;
            // SAFETY: each tap's packed weights span stride_c floats, a multiple of 16 above
            // c0, so c0 + 16 <= stride_c.
            w[ky][kx] = unsafe { L::load(data.add(tap + c0)) };
        }
    }
    w
}

/// 16 lanes from `p`, or only the first `n` when `TAIL`.
///
/// # Safety
/// `p` must be valid for reading 16 floats, or `n` when `TAIL`.
#[inline(always)]
unsafe fn load_lanes<L: Level, const TAIL: bool>(p: *const f32, n: usize) -> L::V {
    if TAIL {
        L::load_masked(p, n)
    } else {
        L::load(p)
    }
}

/// Store 16 lanes to `p`, or only the first `n` when `TAIL`.
///
/// # Safety
/// `p` must be valid for writing 16 floats, or `n` when `TAIL`.
#[inline(always)]
unsafe fn store_lanes<L: Level, const TAIL: bool>(p: *mut f32, n: usize, v: L::V) {
    if TAIL {
        L::store_masked(p, n, v)
    } else {
        L::store(p, v)
    }
}

/// Input rows of the `K` taps of output row `oy`, offset to channel `c0`; `None` outside.
struct TapRows<const K: usize> {
    rows: [Option<*const f32>; K],
}

/// Channels `c0 .. c0 + lanes` of output row `oy`: `lanes` is 16, or fewer (the last block)
/// when `TAIL`.
#[inline(always)]
fn dw_row_fixed<L: Level, const K: usize, const S: usize, const TAIL: bool>(
    job: &DwJob<'_>,
    oy: usize,
    c0: usize,
    lanes: usize,
    w: &[[L::V; K]; K],
    out_row: &mut [f32],
) {
    let g = &job.g;
    let channels = g.cin;
    assert!(lanes <= LANES && (TAIL || lanes == LANES));
    assert!(c0 + lanes <= channels && out_row.len() == g.out_w * channels);
    let iy0 = (oy * S) as isize - g.pad_top as isize;
    let mut taps = TapRows::<K> { rows: [None; K] };
    for ky in 0..K {
        let iy = iy0 + ky as isize;
        if iy >= 0 && (iy as usize) < g.in_h {
            taps.rows[ky] = Some(job.x[iy as usize * g.in_w * channels + c0..].as_ptr());
        }
    }
    // Interior outputs: every tap column inside the input.
    let ox_lo = g.pad_left.div_ceil(S).min(g.out_w);
    let ox_hi = if g.in_w + g.pad_left >= K {
        ((g.in_w + g.pad_left - K) / S + 1).min(g.out_w).max(ox_lo)
    } else {
        ox_lo
    };
    // SAFETY: the padded bias holds stride_c >= c0 + 16 floats.
    let bias = unsafe { L::load(job.bias[c0..][..LANES].as_ptr()) };
    let out = out_row.as_mut_ptr();
    // SAFETY (all blocks below): interior pixels read columns ox * S - pad_left + kx inside
    // the input, border pixels check each column; rows are checked in `taps`; every input
    // read covers channels c0 .. c0 + lanes <= channels, every store one output pixel's lanes.
    unsafe {
        for ox in 0..ox_lo {
            let dst = out.add(ox * channels + c0);
            dw_border::<L, K, S, TAIL>(job, &taps, w, bias, ox, lanes, dst);
        }
        let mut ox = ox_lo;
        while ox + PIXELS <= ox_hi {
            let dst = out.add(ox * channels + c0);
            dw_interior::<L, K, S, PIXELS, TAIL>(job, &taps, w, bias, ox, lanes, dst);
            ox += PIXELS;
        }
        while ox < ox_hi {
            let dst = out.add(ox * channels + c0);
            dw_interior::<L, K, S, 1, TAIL>(job, &taps, w, bias, ox, lanes, dst);
            ox += 1;
        }
        for ox in ox_hi.max(ox_lo)..g.out_w {
            let dst = out.add(ox * channels + c0);
            dw_border::<L, K, S, TAIL>(job, &taps, w, bias, ox, lanes, dst);
        }
    }
}

/// `P` consecutive interior output pixels starting at `ox`; `out` points at the first one.
///
/// # Safety
/// All taps of the `P` pixels must lie inside the input columns; each input pixel and output
/// pixel must hold `lanes` floats (16 unless `TAIL`) from the channel offset.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_interior<
    L: Level,
    const K: usize,
    const S: usize,
    const P: usize,
    const TAIL: bool,
>(
    job: &DwJob<'_>,
    taps: &TapRows<K>,
    w: &[[L::V; K]; K],
    bias: L::V,
    ox: usize,
    lanes: usize,
    out: *mut f32,
) {
    let channels = job.g.cin;
    let ix0 = ox * S - job.g.pad_left;
    let mut acc = [bias; P];
    for ky in 0..K {
        let Some(row) = taps.rows[ky] else { continue };
        for kx in 0..K {
            for p in 0..P {
                let x = load_lanes::<L, TAIL>(row.add((ix0 + p * S + kx) * channels), lanes);
                acc[p] = L::fma(x, w[ky][kx], acc[p]);
            }
        }
    }
    for p in 0..P {
        let v = activate::<L>(job.act, acc[p]);
        store_lanes::<L, TAIL>(out.add(p * channels), lanes, v);
    }
}

/// One output pixel whose taps may leave the input on the left or right.
///
/// # Safety
/// `out` must point at the pixel's `lanes` output floats (16 unless `TAIL`), and each input
/// pixel must hold as many from the channel offset.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dw_border<L: Level, const K: usize, const S: usize, const TAIL: bool>(
    job: &DwJob<'_>,
    taps: &TapRows<K>,
    w: &[[L::V; K]; K],
    bias: L::V,
    ox: usize,
    lanes: usize,
    out: *mut f32,
) {
    let g = &job.g;
    let ix0 = (ox * S) as isize - g.pad_left as isize;
    let mut acc = bias;
    for ky in 0..K {
        let Some(row) = taps.rows[ky] else { continue };
        for kx in 0..K {
            let ix = ix0 + kx as isize;
            if ix >= 0 && (ix as usize) < g.in_w {
                let x = load_lanes::<L, TAIL>(row.add(ix as usize * g.cin), lanes);
                acc = L::fma(x, w[ky][kx], acc);
            }
        }
    }
    store_lanes::<L, TAIL>(out, lanes, activate::<L>(job.act, acc));
}

/// Any kernel size and stride: output rows starting at `oy0`.
#[inline(always)]
fn dw_rows_any<L: Level>(job: &DwJob<'_>, oy0: usize, out: &mut [f32]) {
    let channels = job.g.cout;
    let row_len = job.g.out_w * channels;
    for (r, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let oy = oy0 + r;
        let mut c0 = 0;
        while c0 + 4 * LANES <= channels {
            dw_row_block::<L, 4>(job, oy, c0, out_row);
            c0 += 4 * LANES;
        }
        while c0 + LANES <= channels {
            dw_row_block::<L, 1>(job, oy, c0, out_row);
            c0 += LANES;
        }
        if c0 < channels {
            dw_row_tail::<L>(job, oy, c0, out_row);
        }
    }
}

/// Range of kernel offsets `lo..hi` whose input coordinate `origin + offset` is in `0..size`.
#[inline(always)]
fn tap_range(origin: isize, kernel: usize, size: usize) -> (usize, usize) {
    let lo = (-origin).clamp(0, kernel as isize) as usize;
    let hi = (size as isize - origin).clamp(0, kernel as isize) as usize;
    (lo, hi.max(lo))
}

/// Channels `c0 .. c0 + 16 * NV` (all within `channels`) of output row `oy`.
#[inline(always)]
fn dw_row_block<L: Level, const NV: usize>(
    job: &DwJob<'_>,
    oy: usize,
    c0: usize,
    out_row: &mut [f32],
) {
    let g = &job.g;
    let channels = g.cin;
    let k = g.kernel;
    assert!(c0 + NV * LANES <= channels && out_row.len() == g.out_w * channels);
    let iy0 = (oy * g.stride) as isize - g.pad_top as isize;
    let (ky_lo, ky_hi) = tap_range(iy0, k, g.in_h);
    let x = job.x.as_ptr();
    let w = job.w.data.as_slice().as_ptr();
    let mut bias = [L::zero(); NV];
    for v in 0..NV {
        // SAFETY: the padded bias holds stride_c >= c0 + 16 NV floats.
        bias[v] = unsafe { L::load(job.bias[c0 + v * LANES..][..LANES].as_ptr()) };
    }
    for ox in 0..g.out_w {
        let ix0 = (ox * g.stride) as isize - g.pad_left as isize;
        let (kx_lo, kx_hi) = tap_range(ix0, k, g.in_w);
        let mut acc = bias;
        for ky in ky_lo..ky_hi {
            let iy = (iy0 + ky as isize) as usize;
            for kx in kx_lo..kx_hi {
                let ix = (ix0 + kx as isize) as usize;
                // SAFETY: (iy, ix) is inside the input (tap_range) and c0 + 16 NV <= channels;
                // the tap's packed weights span stride_c >= channels floats.
                unsafe {
                    let xin = x.add((iy * g.in_w + ix) * channels + c0);
                    let wt = w.add((ky * k + kx) * job.w.stride_c + c0);
                    for v in 0..NV {
                        acc[v] = L::fma(
                            L::load(xin.add(v * LANES)),
                            L::load(wt.add(v * LANES)),
                            acc[v],
                        );
                    }
                }
            }
        }
        let dst = &mut out_row[ox * channels + c0..][..NV * LANES];
        for v in 0..NV {
            // SAFETY: `dst` holds NV * 16 floats.
            unsafe {
                L::store(
                    dst.as_mut_ptr().add(v * LANES),
                    activate::<L>(job.act, acc[v]),
                )
            };
        }
    }
}

/// The last `channels - c0` (< 16) channels of output row `oy`.
#[inline(always)]
fn dw_row_tail<L: Level>(job: &DwJob<'_>, oy: usize, c0: usize, out_row: &mut [f32]) {
    let g = &job.g;
    let channels = g.cin;
    let lanes = channels - c0;
    let k = g.kernel;
    let iy0 = (oy * g.stride) as isize - g.pad_top as isize;
    let (ky_lo, ky_hi) = tap_range(iy0, k, g.in_h);
    let bias = load_partial::<L>(&job.bias[c0..][..LANES]);
    for ox in 0..g.out_w {
        let ix0 = (ox * g.stride) as isize - g.pad_left as isize;
        let (kx_lo, kx_hi) = tap_range(ix0, k, g.in_w);
        let mut acc = bias;
        for ky in ky_lo..ky_hi {
            let iy = (iy0 + ky as isize) as usize;
            for kx in kx_lo..kx_hi {
                let ix = (ix0 + kx as isize) as usize;
                let xin = load_partial::<L>(&job.x[(iy * g.in_w + ix) * channels + c0..][..lanes]);
                let wt = load_partial::<L>(
                    &job.w.data.as_slice()[(ky * k + kx) * job.w.stride_c + c0..][..LANES],
                );
                acc = L::fma(xin, wt, acc);
            }
        }
        store_partial::<L>(
            &mut out_row[ox * channels + c0..][..lanes],
            activate::<L>(job.act, acc),
        );
    }
}
