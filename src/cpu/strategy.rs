//! Which algorithm computes each conv node, and how it reads its input: chosen once per
//! node when the backend plans a graph (see `plan`), never while running it.
//!
//! A strategy knows whether it applies to a node (from the forms its weights were packed
//! in, and the node's shape); a node gets the first, in order of preference, that applies.
//! How a conv reads a folded input (see `fold`) is settled after the folds, which depend on
//! which readers run Winograd (an upsample folds only into Winograd, an expand conv only
//! into depthwise, a squeeze-excite only into the direct 1x1 conv).

use std::fmt;

use super::fold::Fold;
use super::kernels::{ConvGeometry, PackedConv, PackedDepthwise, PackedWinograd, Schedule};
use crate::graph::{ConvWeights, ValueId};

/// Input channels from which a 3x3 conv is also packed for Winograd (the stem, with 3,
/// is stride 2 anyway; with very few channels the transforms would dominate).
const WINOGRAD_MIN_CIN: usize = 16;
/// Largest Winograd weight set (36 * cin * cout floats) worth packing (also bounds the extra
/// memory: 4x the plain weights). dec0.conv1 (1216 -> 256, 45 MB) on its few tiles runs
/// Winograd's by-position schedule, which reads each transformed weight once: single thread,
/// 16x16 map: direct 9.1 ms, Winograd 3.6 (the old tile-block schedule: 10.4); 32x32: 42 vs
/// 14 (37.8). dec0.conv2 (256 -> 256, 9.4 MB), 16x16: 1.9 vs 1.1 ms.
const WINOGRAD_MAX_WEIGHT_FLOATS: usize = 16 << 20;

/// A conv's weights, packed once for every strategy that can apply to it.
pub(super) enum PackedWeights {
    Dense(PackedConv),
    /// 3x3 weights: Winograd for stride 1, the direct packing for anything else.
    Dense3x3(PackedWinograd, PackedConv),
    Depthwise(PackedDepthwise),
}

impl PackedWeights {
    pub(super) fn pack(c: &ConvWeights) -> Self {
        if c.depthwise {
            PackedWeights::Depthwise(PackedDepthwise::pack(&c.weight, c.cout, c.kernel))
        } else if c.kernel == 3
            && c.cin >= WINOGRAD_MIN_CIN
            && 36 * c.cin * c.cout <= WINOGRAD_MAX_WEIGHT_FLOATS
        {
            PackedWeights::Dense3x3(
                PackedWinograd::pack(&c.weight, c.cout, c.cin),
                PackedConv::pack(&c.weight, c.cout, c.cin, c.kernel),
            )
        } else {
            PackedWeights::Dense(PackedConv::pack(&c.weight, c.cout, c.cin, c.kernel))
        }
    }
}

/// How the CPU backend computes one conv node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvStrategy {
    /// Winograd F(4x4, 3x3), each transformed weight read once over all tiles: few tiles
    /// and many channels (dec0), where the weights outweigh the inputs.
    WinogradByPosition(ConvInput),
    /// Winograd F(4x4, 3x3) by blocks of tiles that stay in L2: many tiles (dec1..dec4).
    WinogradTileBlocked(ConvInput),
    /// The implicit GEMM over the taps: any dense conv.
    Direct,
    /// One kxk filter per channel: depthwise convs, and only they.
    Depthwise,
    /// A depthwise conv on the output of the 1x1 expand conv node `expand`, which it
    /// computes by row bands itself (`Fold::Expanded`).
    DepthwiseOverExpand { expand: usize },
    /// The direct conv (1x1) of a squeeze-excite of `x` whose gates alone were computed
    /// (`Fold::ChannelGates`): it scales `x` by them as it reads it.
    DirectGated { x: ValueId },
}

/// How a conv reads its input value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvInput {
    /// The input value, as the graph computed it.
    Plain,
    /// The nearest-neighbour 2x upsampling of `half`: the input value is never computed.
    Upsampled { half: ValueId },
    /// The scSE over the concat of the 2x upsampled `half` and `skip`: only its gates are
    /// computed, into the start of the input value's place.
    GatedConcat { half: ValueId, skip: ValueId },
}

impl ConvStrategy {
    /// Every strategy, in order of preference, reading its input plainly.
    const PREFERENCE: [ConvStrategy; 4] = [
        ConvStrategy::WinogradByPosition(ConvInput::Plain),
        ConvStrategy::WinogradTileBlocked(ConvInput::Plain),
        ConvStrategy::Direct,
        ConvStrategy::Depthwise,
    ];

    /// The first strategy that applies to a conv of geometry `g` on `weights`.
    pub(super) fn choose(g: &ConvGeometry, weights: &PackedWeights) -> ConvStrategy {
        Self::PREFERENCE
            .into_iter()
            .find(|s| s.applies(g, weights))
            .expect("the direct or the depthwise conv applies to every conv")
    }

    /// Whether this strategy computes a conv of geometry `g` on `weights` (Winograd: only
    /// stride-1 3x3 convs packed for it; by position: only where that schedule suits the
    /// shape, see `Schedule::for_shape`).
    pub(super) fn applies(self, g: &ConvGeometry, weights: &PackedWeights) -> bool {
        match (self, weights) {
            (ConvStrategy::WinogradByPosition(_), PackedWeights::Dense3x3(w, _)) => {
                g.stride == 1 && Schedule::for_shape(g, w) == Schedule::ByPosition
            }
            (ConvStrategy::WinogradTileBlocked(_), PackedWeights::Dense3x3(..)) => g.stride == 1,
            (ConvStrategy::Direct, PackedWeights::Dense(_) | PackedWeights::Dense3x3(..)) => true,
            (ConvStrategy::Depthwise, PackedWeights::Depthwise(_)) => true,
            // The folded-input strategies are only ever given by `reading`.
            _ => false,
        }
    }

    /// The Winograd schedule, for the Winograd strategies.
    pub(super) fn schedule(self) -> Option<Schedule> {
        match self {
            ConvStrategy::WinogradByPosition(_) => Some(Schedule::ByPosition),
            ConvStrategy::WinogradTileBlocked(_) => Some(Schedule::TileBlocked),
            ConvStrategy::Direct
            | ConvStrategy::DirectGated { .. }
            | ConvStrategy::Depthwise
            | ConvStrategy::DepthwiseOverExpand { .. } => None,
        }
    }

    /// How the input is read (plainly but for Winograd on a folded input).
    pub fn input(self) -> ConvInput {
        match self {
            ConvStrategy::WinogradByPosition(input) | ConvStrategy::WinogradTileBlocked(input) => {
                input
            }
            ConvStrategy::Direct
            | ConvStrategy::DirectGated { .. }
            | ConvStrategy::Depthwise
            | ConvStrategy::DepthwiseOverExpand { .. } => ConvInput::Plain,
        }
    }

    /// This strategy reading an input produced as `fold` says; `fold` must be one this
    /// strategy reads (`fold::plan_folds` folds upsamples only into Winograd readers and
    /// expand convs only into depthwise ones).
    pub(super) fn reading(self, fold: Fold) -> ConvStrategy {
        let input = match fold {
            Fold::Computed | Fold::Skipped => return self,
            Fold::ChannelGates { input } => {
                assert_eq!(
                    self,
                    ConvStrategy::Direct,
                    "gates are only read by the direct conv"
                );
                return ConvStrategy::DirectGated { x: input };
            }
            Fold::Expanded { node } => {
                assert_eq!(
                    self,
                    ConvStrategy::Depthwise,
                    "an expand is only read by depthwise"
                );
                return ConvStrategy::DepthwiseOverExpand { expand: node };
            }
            Fold::Upsampled { half } => ConvInput::Upsampled { half },
            Fold::GatedConcat { half, skip } => ConvInput::GatedConcat { half, skip },
        };
        match self {
            ConvStrategy::WinogradByPosition(_) => ConvStrategy::WinogradByPosition(input),
            ConvStrategy::WinogradTileBlocked(_) => ConvStrategy::WinogradTileBlocked(input),
            ConvStrategy::Direct
            | ConvStrategy::DirectGated { .. }
            | ConvStrategy::Depthwise
            | ConvStrategy::DepthwiseOverExpand { .. } => {
                unreachable!("a folded upsample is only read by Winograd")
            }
        }
    }
}

/// As `bench --profile` prints it: `winograd by-position, gated-concat input`.
impl fmt::Display for ConvStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ConvStrategy::WinogradByPosition(_) => "winograd by-position",
            ConvStrategy::WinogradTileBlocked(_) => "winograd tile-blocked",
            ConvStrategy::Direct => "direct",
            ConvStrategy::DirectGated { .. } => "direct, squeeze-excite read through",
            ConvStrategy::Depthwise => "depthwise",
            ConvStrategy::DepthwiseOverExpand { .. } => "depthwise, expand folded in",
        };
        match self.input() {
            ConvInput::Plain => write!(f, "{name}"),
            ConvInput::Upsampled { .. } => write!(f, "{name}, upsampled input"),
            ConvInput::GatedConcat { .. } => write!(f, "{name}, gated-concat input"),
        }
    }
}
