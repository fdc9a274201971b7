//! The front of an MBConv block fused by row bands: the 1x1 expand conv (with its swish) and
//! the depthwise conv that reads it.
//!
//! The expanded map is the largest tensor of its block (block2: 9.4 MB at 256, 37.7 MB at
//! 512), written by the expand and read back by the depthwise conv: at 512 both run at DRAM
//! speed. Here it never exists in full. Each task owns a range of output rows and walks it in
//! bands: it expands only the input rows the band needs into a buffer that stays in L2, keeps
//! the rows the next band shares with this one (`kernel - stride` of them), and runs the
//! depthwise rows on the buffer. Every value is computed by the unfused kernels in the same
//! order, so the output is the unfused output bit for bit, whatever the bands and threads.

use std::cell::Cell;

use rayon::prelude::*;

use super::conv::{PackedConv, PointwiseRuns};
use super::depthwise::{dw_rows_isa, DwJob, PackedDepthwise};
use super::isa::Isa;
use super::{Activation, ConvGeometry};

/// Floats of expanded rows a band's buffer holds (384 KB, well inside a 1 MB L2 beside the
/// depthwise output rows and the expand weights); at least one band's worth is always held.
const BAND_FLOATS: usize = 96 << 10;
/// Work (multiply-adds of both convs) below which everything runs on the calling thread.
const SERIAL_MACS: usize = 1 << 20;

/// The 1x1 conv in front of the depthwise conv: `act(x w + bias)`.
pub(crate) struct Expand<'a> {
    pub(crate) w: &'a PackedConv,
    pub(crate) bias: &'a [f32],
    pub(crate) act: Activation,
}

/// What every task reads.
struct FrontJob<'a> {
    /// The block input, `in_h x in_w x expand.w.cin()`.
    x: &'a [f32],
    /// Floats per row of `x`.
    x_row: usize,
    expand: PointwiseRuns<'a>,
    /// The depthwise conv's geometry (its input: the expanded map).
    g: ConvGeometry,
    w: &'a PackedDepthwise,
    /// Depthwise bias, padded as its kernel wants.
    bias: &'a [f32],
    act: Activation,
    /// Output rows per band.
    band_rows: usize,
}

thread_local! {
    /// A task's expanded rows.
    static BAND: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `y = depthwise(expand(x))` with both convs' bias and activation, without the expanded
/// map: the same contract as `conv2d_nhwc_isa` (1x1, stride 1, no padding, no residual)
/// followed by `depthwise_conv2d_nhwc_isa` with geometry `g`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise_over_expand_isa(
    isa: Isa,
    x: &[f32],
    expand: &Expand<'_>,
    g: &ConvGeometry,
    w: &PackedDepthwise,
    bias: &[f32],
    act: Activation,
    y: &mut [f32],
) {
    let ew = expand.w;
    assert!(ew.kernel() == 1, "the expand conv must be 1x1");
    assert!(
        ew.cout() > 1,
        "an expand to one channel is not fused (another sum order)"
    );
    assert_eq!(
        ew.cout(),
        g.cin,
        "the expand conv must give the depthwise input channels"
    );
    assert_eq!(expand.bias.len(), ew.cout(), "expand bias length");
    assert_eq!(x.len(), g.in_h * g.in_w * ew.cin(), "block input length");
    assert!(g.stride > 0 && g.cin == g.cout, "depthwise geometry");
    assert!(
        g.cin == w.channels() && g.kernel == w.kernel(),
        "depthwise weights do not match the geometry"
    );
    assert_eq!(bias.len(), g.cout, "depthwise bias length");
    assert_eq!(y.len(), g.output_len(), "depthwise output length");
    if y.is_empty() {
        return;
    }
    let (k, s) = (g.kernel, g.stride);
    let row_floats = g.in_w * g.cin;
    // A band of b output rows needs (b - 1) * s + k input rows.
    let fit = (BAND_FLOATS / row_floats.max(1)).max(k);
    let band_rows = ((fit - k) / s + 1).min(g.out_h);
    let padded_bias = w.padded_bias(bias);
    let job = FrontJob {
        x,
        x_row: g.in_w * ew.cin(),
        expand: PointwiseRuns::new(ew, expand.bias, expand.act),
        g: *g,
        w,
        bias: &padded_bias,
        act,
        band_rows,
    };
    let macs = g.in_h * g.in_w * ew.cin() * g.cin + y.len() * k * k;
    let threads = rayon::current_num_threads();
    let row_len = g.out_w * g.cout;
    if threads <= 1 || macs < SERIAL_MACS {
        front_task(isa, &job, 0, y);
        return;
    }
    // Two tasks per thread: each recomputes the `k - s` rows it shares with the task above.
    let rows_per_task = g.out_h.div_ceil(2 * threads);
    y.par_chunks_mut(rows_per_task * row_len)
        .enumerate()
        .for_each(|(i, rows)| front_task(isa, &job, i * rows_per_task, rows));
}

/// Output rows `oy0 ..` (whole rows in `out`), band by band.
fn front_task(isa: Isa, job: &FrontJob<'_>, oy0: usize, out: &mut [f32]) {
    let g = &job.g;
    let row_floats = g.in_w * g.cin;
    let row_len = g.out_w * g.cout;
    let out_rows = out.len() / row_len;
    let mut buf = BAND.with(|cell| cell.take());
    let needed = ((job.band_rows - 1) * g.stride + g.kernel) * row_floats;
    if buf.len() < needed {
        buf.resize(needed, 0.0);
    }
    // Input rows `held.0 .. held.1` of the expanded map are at the start of `buf`.
    let mut held = (0, 0);
    let mut r = 0;
    while r < out_rows {
        let rows = job.band_rows.min(out_rows - r);
        let (lo, hi, pad_top) = band_input_rows(g, oy0 + r, rows);
        // Rows this band shares with the last one move to the front; the rest are expanded.
        let mut have = lo;
        if held.0 <= lo && lo < held.1 {
            let keep = held.1.min(hi) - lo;
            let from = (lo - held.0) * row_floats;
            buf.copy_within(from..from + keep * row_floats, 0);
            have = lo + keep;
        }
        if have < hi {
            let dst = &mut buf[(have - lo) * row_floats..(hi - lo) * row_floats];
            expand_rows(isa, job, have, hi, dst);
        }
        held = (lo, hi);
        let local = ConvGeometry {
            in_h: hi - lo,
            out_h: rows,
            pad_top,
            ..*g
        };
        let dw = DwJob {
            x: &buf[..(hi - lo) * row_floats],
            g: local,
            w: job.w,
            bias: job.bias,
            act: job.act,
        };
        dw_rows_isa(isa, &dw, 0, &mut out[r * row_len..(r + rows) * row_len]);
        r += rows;
    }
    BAND.with(|cell| cell.replace(buf));
}

/// The input rows `lo .. hi` that output rows `oy .. oy + rows` read (clipped to the map),
/// and the padding above `lo` as the band's own geometry sees it.
fn band_input_rows(g: &ConvGeometry, oy: usize, rows: usize) -> (usize, usize, usize) {
    let first = (oy * g.stride) as isize - g.pad_top as isize;
    let end = ((oy + rows - 1) * g.stride + g.kernel) as isize - g.pad_top as isize;
    let lo = first.clamp(0, g.in_h as isize) as usize;
    let hi = end.clamp(lo as isize, g.in_h as isize) as usize;
    (lo, hi, (lo as isize - first) as usize)
}

/// Expanded rows `r0 .. r1` of the map into `dst`, on this thread.
fn expand_rows(isa: Isa, job: &FrontJob<'_>, r0: usize, r1: usize, dst: &mut [f32]) {
    job.expand
        .run(isa, &job.x[r0 * job.x_row..r1 * job.x_row], dst);
}
