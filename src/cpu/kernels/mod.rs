//! CPU numerical kernels: NHWC float32, batch 1, multithreaded with rayon, compiled per
//! instruction set (AVX-512, AVX2+FMA, portable) and dispatched once at run time
//! (`METAUAS_ISA=portable|avx2|avx512` forces a lower level).
//!
//! Floors (what each family cannot beat; P = output pixels). How close each kernel comes,
//! and the machine's measured FMA peak and bandwidths, are in docs/BENCHMARKS.md
//! ("Kernel floors and how close the kernels come").
//! - `conv2d_nhwc`: 2 * P * cout * k^2 * cin FLOPs over 4 * (input + weights + output) bytes.
//!   Every decoder conv and every pointwise conv with cin >= 64 does more than 30 FLOPs per
//!   byte, so the floor is FLOPs / FMA peak. The implicit GEMM keeps 24 zmm accumulators per
//!   8 pixels x 48 channels. Pointwise convs with cin 24-48 sit at 6-12 FLOPs per byte: there
//!   the output write bounds them. A 1x1 conv to one channel (the mask head) is a dot product
//!   per pixel, bound by reading its input.
//! - `conv3x3_winograd_nhwc` (stride-1 3x3, decoder): F(4x4, 3x3) does 36 / 144 of the
//!   direct multiply-adds plus transforms of O(cin + cout) per 4x4 tile: its floor is 1/4 of
//!   the direct one, as long as the transformed weights (36 * cin * cout floats, 4x the plain
//!   ones) are re-read from cache. With many tiles, units are tile blocks (weights re-read per
//!   block); with few tiles and many channels (dec0: 16 or 64 tiles, 1216 -> 256, 45 MB of
//!   weights) a by-position schedule reads each weight once: its floor is then the larger of
//!   the FLOPs and streaming the weights, which the weight prefetch overlaps.
//! - `depthwise_conv2d_nhwc`: 2 * k^2 FLOPs per output element against 8 bytes moved
//!   (one input read, one output write; 18-50 FLOPs per 8 bytes): bandwidth bound on large
//!   maps; on small ones the fused swish (about 20 vector ops) costs as much as a 3x3 sum.
//! - `squeeze_excite_nhwc`: two passes over the tensor (mean, then scale): 12 bytes per
//!   element, plus 8 * channels * squeeze bytes of FC weights, which dominate on the 8x8
//!   maps (1632 x 68: 0.9 MB of weights against 0.4 MB of map, read from L3).
//! - `scse_nhwc`: two passes (mean, then per-pixel dot and scale): 12 bytes and 4 FLOPs per
//!   element.
//! - `soft_align_nhwc`: 2 * n^2 * (hidden + cin) FLOPs and n^2 exponentials over
//!   4 * n * (2 * hidden + 3 * cin) bytes: FMA bound (flash-attention style, nothing n x n
//!   is stored). The n^2 * hidden logit products run in f64 (half the f32 rate) for accuracy.
//! - `upsample2x_concat_nhwc`: a copy, 4 * (h * w * cx + 4 * h * w * (cx + 2 * cs)) bytes.

mod align;
mod attention;
mod conv;
mod depthwise;
mod gemm;
mod isa;
mod mbconv;
// AVX-512 (`target_feature(enable = "avx512f")` and its intrinsics) is stable since Rust
// 1.89, so the crate's `rust-version` must be at least that.
mod partition;
mod peak;
#[clippy::msrv = "1.89"]
mod simd;
mod upsample;
mod winograd;

#[cfg(test)]
mod fused_tests;
#[cfg(test)]
mod tests;

pub use conv::PackedConv;
pub use depthwise::PackedDepthwise;
pub use winograd::PackedWinograd;
pub(crate) use winograd::{GatedConcat, InputLayout, Schedule};

/// The instruction set the kernels run with on this CPU (`avx512`, `avx2` or `portable`;
/// `METAUAS_ISA` may lower it): what a benchmark table must name beside its times.
pub fn isa_name() -> &'static str {
    isa::Isa::selected().name()
}

/// The float32 FMA peak of one core at the selected instruction set, in GFLOP/s (the
/// profile's "% peak" column divides by it).
pub fn fma_peak_gflops_per_core() -> f64 {
    isa::Isa::selected().fma_peak_gflops_per_core()
}

pub use peak::measured_fma_peak_gflops;

/// The graph's parameter types, under the names the kernels use.
pub use crate::graph::{
    Activation, ConvGeometry, ScseWeights as Scse, SqueezeExciteWeights as SqueezeExcite,
};

use isa::Isa;

/// `y = act(conv(x, w) + bias)` [+ residual, added AFTER the activation; only used with Identity]
pub fn conv2d_nhwc(
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedConv,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    conv::conv2d_nhwc_isa(Isa::selected(), x, g, w, bias, act, residual, y)
}

/// The same as [`conv2d_nhwc`] for a stride-1 3x3 convolution (any padding), by
/// Winograd F(4x4, 3x3): 4x fewer multiply-adds, weights packed by [`PackedWinograd`].
pub fn conv3x3_winograd_nhwc(
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    winograd::winograd_conv3x3_nhwc_isa(Isa::selected(), x, g, w, bias, act, residual, y)
}

/// [`conv3x3_winograd_nhwc`] on an input `x` held as `layout` says (the input itself, or
/// one folded into the conv: see the wrappers below), by the `schedule` the CPU backend's
/// plan chose for the node.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3_winograd_planned(
    schedule: Schedule,
    x: &[f32],
    layout: InputLayout<'_>,
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    let isa = Isa::selected();
    winograd::winograd_conv3x3_isa(isa, schedule, x, layout, g, w, bias, act, residual, y)
}

/// [`conv3x3_winograd_nhwc`] on the nearest-neighbour 2x upsampling of `x_half`, which is
/// never materialized (`g` describes the upsampled input).
pub fn conv3x3_winograd_upsampled_nhwc(
    x_half: &[f32],
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    winograd::winograd_conv3x3_upsampled_nhwc_isa(
        Isa::selected(),
        x_half,
        g,
        w,
        bias,
        act,
        residual,
        y,
    )
}

/// [`conv3x3_winograd_nhwc`] on the decoder's gated concat `u * (channel_gate[c] +
/// spatial_gate[p])`, `u` being the 2x upsampling of `x_half` (its first `x_channels`
/// channels, a multiple of 16) concatenated with `skip`; `u` is never materialized (`g`
/// describes it).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_winograd_gated_concat_nhwc(
    x_half: &[f32],
    x_channels: usize,
    skip: &[f32],
    channel_gate: &[f32],
    spatial_gate: &[f32],
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    act: Activation,
    y: &mut [f32],
) {
    let concat = winograd::GatedConcat {
        skip,
        x_channels,
        channel_gate,
        spatial_gate,
    };
    winograd::winograd_conv3x3_gated_concat_nhwc_isa(
        Isa::selected(),
        x_half,
        concat,
        g,
        w,
        bias,
        act,
        y,
    )
}

/// The scSE gates of the decoder's concat of `x_half` (`(h, w, channels)`, 2x upsampled)
/// and `skip`, without materializing it: see [`conv3x3_winograd_gated_concat_nhwc`].
pub fn scse_gates_upsampled_concat(
    x_half: &[f32],
    half_shape: (usize, usize, usize),
    skip: &[f32],
    w: &Scse,
    channel_gate: &mut [f32],
    spatial_gate: &mut [f32],
) {
    attention::scse_gates_upsampled_concat_isa(
        Isa::selected(),
        x_half,
        half_shape,
        skip,
        w,
        channel_gate,
        spatial_gate,
    )
}

/// Depthwise kxk (groups = channels, cin == cout), weights given as (c, 1, k, k).
pub fn depthwise_conv2d_nhwc(
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedDepthwise,
    bias: &[f32],
    act: Activation,
    y: &mut [f32],
) {
    depthwise::depthwise_conv2d_nhwc_isa(Isa::selected(), x, g, w, bias, act, y)
}

/// `y = depthwise(act_e(x w_e + bias_e))`: a 1x1 expand conv (stride 1, no padding, no
/// residual) and the depthwise conv of geometry `g` that reads its output, fused by row
/// bands so that the expanded map is never written (the same values as the two convs).
#[allow(clippy::too_many_arguments)]
pub fn depthwise_over_expand_nhwc(
    x: &[f32],
    expand_w: &PackedConv,
    expand_bias: &[f32],
    expand_act: Activation,
    g: &ConvGeometry,
    w: &PackedDepthwise,
    bias: &[f32],
    act: Activation,
    y: &mut [f32],
) {
    let expand = mbconv::Expand {
        w: expand_w,
        bias: expand_bias,
        act: expand_act,
    };
    mbconv::depthwise_over_expand_isa(Isa::selected(), x, &expand, g, w, bias, act, y)
}

/// Squeeze-excite: the formula is on [`SqueezeExcite`].
pub fn squeeze_excite_nhwc(x: &[f32], pixels: usize, se: &SqueezeExcite, y: &mut [f32]) {
    attention::squeeze_excite_nhwc_isa(Isa::selected(), x, pixels, se, y)
}

/// The channel gates alone of a squeeze-excite (`gate[c]`, what [`squeeze_excite_nhwc`]
/// scales channel `c` by), for maps where [`squeeze_excite_gates_apply`] says so.
pub fn squeeze_excite_gates(x: &[f32], pixels: usize, se: &SqueezeExcite, gate: &mut [f32]) {
    attention::squeeze_excite_gates_isa(Isa::selected(), x, pixels, se, gate)
}

/// Whether [`squeeze_excite_gates`] takes a map of `pixels` pixels (smaller maps compute the
/// gates by channel blocks, fused with the scaling).
pub fn squeeze_excite_gates_apply(pixels: usize) -> bool {
    attention::gates_alone_apply(pixels)
}

/// [`conv2d_nhwc`] of a 1x1 stride-1 conv without padding on the input
/// `x[p, c] * gate[c]` (a squeeze-excite read through: the same values as scaling first).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_gated_nhwc(
    x: &[f32],
    gate: &[f32],
    g: &ConvGeometry,
    w: &PackedConv,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    conv::conv2d_gated_nhwc_isa(Isa::selected(), x, Some(gate), g, w, bias, act, residual, y)
}

/// scSE: the formula is on [`Scse`].
pub fn scse_nhwc(x: &[f32], pixels: usize, w: &Scse, y: &mut [f32]) {
    attention::scse_nhwc_isa(Isa::selected(), x, pixels, w, y)
}

/// Soft feature alignment, fused, never materializing the n x n matrix:
/// `y[i, 0..cin] = fq[i, ..];  y[i, cin..2cin] = sum_j softmax_j(sum_c q[i,c] k[j,c]) * fp[j, ..]`
/// fq, fp: n x cin; q, k: n x hidden (all row-major, position-major). NO 1/sqrt(d) scaling.
/// Numerically safe for logits in the thousands (online, max-subtracted softmax).
#[allow(clippy::too_many_arguments)]
pub fn soft_align_nhwc(
    fq: &[f32],
    q: &[f32],
    k: &[f32],
    fp: &[f32],
    n: usize,
    cin: usize,
    hidden: usize,
    y: &mut [f32],
) {
    align::soft_align_nhwc_isa(Isa::selected(), fq, q, k, fp, n, cin, hidden, y)
}

/// Nearest upsample x2 of x (h x w x cx) followed by channel concat with skip ((2h) x (2w) x cs);
/// y is (2h) x (2w) x (cx + cs), upsampled channels first.
pub fn upsample2x_concat_nhwc(
    x: &[f32],
    h: usize,
    w: usize,
    cx: usize,
    skip: Option<&[f32]>,
    cs: usize,
    y: &mut [f32],
) {
    upsample::upsample2x_concat_nhwc(x, h, w, cx, skip, cs, y)
}
