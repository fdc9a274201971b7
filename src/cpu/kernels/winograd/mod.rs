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
//! The parts, by job:
//! - [`pack`]: the weights, transformed (`U = G g G^T`) and packed once at load time;
//! - [`transform`]: the three transforms themselves;
//! - [`input`]: where the input is read from (plain, upsampled, gated concat) and the input
//!   transform into `V[pos][tile][channel]`;
//! - [`schedule`]: which schedule a shape gets, the work units, and the GEMM step both run
//!   (`M[pos] (+)= V[pos] x U[pos]`, register-tiled);
//! - [`tile_blocked`] and [`by_position`]: the two schedules;
//! - [`output`]: the output transform, bias, activation and residual, and the store.

mod by_position;
mod input;
mod output;
mod pack;
mod schedule;
mod tile_blocked;
mod transform;

pub(crate) use input::{GatedConcat, InputLayout};
pub use pack::PackedWinograd;
pub(crate) use schedule::Schedule;

use super::isa::Isa;
use super::partition::OutPtr;
use super::simd::LANES;
use super::{Activation, ConvGeometry};
use schedule::Plan;

/// Output tile side.
const TILE: usize = 4;
/// Input patch side (TILE + 3 - 1).
const PATCH: usize = 6;
/// Elementwise products per tile (PATCH^2).
const POS: usize = PATCH * PATCH;

/// Everything a schedule's units read: one conv call, checked, with its work partition.
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

/// `y = act(conv3x3(x, w) + bias)` [+ residual], stride 1, any padding; the same contract
/// as `conv2d_nhwc_isa`. The schedule is picked by shape ([`Schedule::for_shape`]).
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
    let schedule = Schedule::for_shape(g, w);
    let layout = InputLayout::Plain;
    winograd_conv3x3_isa(isa, schedule, x, layout, g, w, bias, act, residual, y)
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
    let schedule = schedule.unwrap_or_else(|| Schedule::for_shape(g, w));
    let layout = InputLayout::Plain;
    winograd_conv3x3_isa(isa, schedule, x, layout, g, w, bias, act, residual, y)
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
    let schedule = Schedule::for_shape(g, w);
    let layout = InputLayout::GatedConcat(concat);
    winograd_conv3x3_isa(isa, schedule, x_half, layout, g, w, bias, act, None, y)
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
    let schedule = Schedule::for_shape(g, w);
    let layout = InputLayout::Upsampled;
    winograd_conv3x3_isa(isa, schedule, x_half, layout, g, w, bias, act, residual, y)
}

/// The Winograd conv of an input `x` held as `layout` says, by `schedule`: the one entry
/// every wrapper (and the CPU backend, with the schedule its plan chose) goes through.
#[allow(clippy::too_many_arguments)]
pub(crate) fn winograd_conv3x3_isa(
    isa: Isa,
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
    check_lengths(x, &layout, g, w, bias, residual, y);
    if g.out_h * g.out_w == 0 {
        return;
    }
    let zeros = vec![0.0; g.cin + LANES];
    let mut padded_bias = vec![0.0; g.cout.next_multiple_of(LANES)];
    padded_bias[..g.cout].copy_from_slice(bias);
    let plan = schedule::plan(g, w, rayon::current_num_threads());
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
        Schedule::TileBlocked => tile_blocked::run(isa, &job),
        Schedule::ByPosition => by_position::run(isa, &job),
    }
}

/// Asserts everything the schedules' unchecked loads and stores rely on.
fn check_lengths(
    x: &[f32],
    layout: &InputLayout<'_>,
    g: &ConvGeometry,
    w: &PackedWinograd,
    bias: &[f32],
    residual: Option<&[f32]>,
    y: &[f32],
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
}
