//! The Rust side of every kernel's interface with its WGSL file: one `#[repr(C)]` uniform
//! struct per entry point (the named fields of the WGSL `struct`, in order), its override
//! constants, and the codes of `activate` and of the input modes. The codes are defined here
//! only: `wgsl_constants` writes them into the header prepended to every shader. The tests
//! below parse each WGSL file with naga and check the structs and overrides against it.

use bytemuck::{Pod, Zeroable};

use super::device::Family;
use crate::graph::Activation;

/// Bytes of one uniform slot: every kernel's struct fits, zero-padded.
pub const UNIFORM_BYTES: usize = 64;

/// The WGSL type of a uniform field or override constant (what the tests compare).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    U32,
    F32,
    Bool,
}

/// A Rust type that stands for a WGSL scalar.
pub trait WgslScalar: Copy {
    #[cfg_attr(not(test), allow(dead_code))]
    const SCALAR: Scalar;
}

/// A type an override constant can have; `word` is its pipeline-constant value (wgpu takes
/// the number, so no f32 overrides: a float's bits would be taken for its value).
pub trait OverrideValue: WgslScalar {
    fn word(self) -> u32;
}

impl WgslScalar for u32 {
    const SCALAR: Scalar = Scalar::U32;
}

impl WgslScalar for f32 {
    const SCALAR: Scalar = Scalar::F32;
}

impl WgslScalar for bool {
    const SCALAR: Scalar = Scalar::Bool;
}

impl OverrideValue for u32 {
    fn word(self) -> u32 {
        self
    }
}

impl OverrideValue for bool {
    fn word(self) -> u32 {
        self as u32
    }
}

/// `activate`'s codes (common.wgsl): the WGSL constants are generated from this table.
const ACTIVATIONS: [(Activation, &str); 4] = [
    (Activation::Identity, "ACT_IDENTITY"),
    (Activation::Relu, "ACT_RELU"),
    (Activation::Swish, "ACT_SWISH"),
    (Activation::Sigmoid, "ACT_SIGMOID"),
];

impl WgslScalar for Activation {
    const SCALAR: Scalar = Scalar::U32;
}

impl OverrideValue for Activation {
    fn word(self) -> u32 {
        ACTIVATIONS
            .iter()
            .position(|&(a, _)| a == self)
            .expect("every activation has a code") as u32
    }
}

/// How a conv (or the scSE spatial gate) reads its input; `INPUT_MODE` in the WGSL files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputMode {
    Plain,
    /// Scaled per channel by `cgate` (squeeze-excite folded in).
    ChannelScaled,
    /// Nearest-x2 upsample of `x` concatenated with `skip`, never written out.
    UpConcat,
    /// As `UpConcat`, then scaled by the scSE gates: `v * cgate[c] + v * sgate[p]`.
    UpConcatGated,
}

const INPUT_MODES: [(InputMode, &str); 4] = [
    (InputMode::Plain, "INPUT_PLAIN"),
    (InputMode::ChannelScaled, "INPUT_CHANNEL_SCALED"),
    (InputMode::UpConcat, "INPUT_UP_CONCAT"),
    (InputMode::UpConcatGated, "INPUT_UP_CONCAT_GATED"),
];

impl WgslScalar for InputMode {
    const SCALAR: Scalar = Scalar::U32;
}

impl OverrideValue for InputMode {
    fn word(self) -> u32 {
        INPUT_MODES
            .iter()
            .position(|&(m, _)| m == self)
            .expect("every input mode has a code") as u32
    }
}

/// The WGSL `const` declarations of the activation and input-mode codes.
pub fn wgsl_constants() -> String {
    let activations = ACTIVATIONS.iter().map(|&(a, name)| (name, a.word()));
    let modes = INPUT_MODES.iter().map(|&(m, name)| (name, m.word()));
    activations
        .chain(modes)
        .map(|(name, code)| format!("const {name}: u32 = {code}u;\n"))
        .collect()
}

/// A named field of a uniform struct: what the WGSL side must declare at the same offset.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub scalar: Scalar,
}

/// The override constants of one kernel.
pub trait Overrides {
    /// Name and type of each, as the WGSL file declares them.
    #[cfg_attr(not(test), allow(dead_code))]
    const DECLARED: &'static [(&'static str, Scalar)];
    /// `(name, value)` pairs for the pipeline, in `DECLARED` order.
    fn values(&self) -> Vec<(&'static str, u32)>;
}

/// Kernels without override constants.
impl Overrides for () {
    const DECLARED: &'static [(&'static str, Scalar)] = &[];
    fn values(&self) -> Vec<(&'static str, u32)> {
        Vec::new()
    }
}

/// One entry point: its uniform parameters (the implementing struct) and where they go.
pub trait Kernel: Pod {
    const FAMILY: Family;
    const ENTRY: &'static str;
    /// The WGSL struct these parameters are (checked by the tests), and its uniform binding.
    #[cfg_attr(not(test), allow(dead_code))]
    const STRUCT: &'static str;
    const BINDING: u32;
    #[cfg_attr(not(test), allow(dead_code))]
    const FIELDS: &'static [Field];
    type Overrides: Overrides;

    /// The parameters as one uniform slot, zero-padded.
    fn uniform_words(&self) -> [u32; UNIFORM_BYTES / 4] {
        const { assert!(std::mem::size_of::<Self>() <= UNIFORM_BYTES) };
        let mut words = [0u32; UNIFORM_BYTES / 4];
        let bytes = bytemuck::bytes_of(self);
        bytemuck::bytes_of_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
        words
    }
}

/// Declares an override-constant struct: `WGSL_NAME => field: Type` per constant.
macro_rules! overrides {
    ($(#[$meta:meta])* $name:ident { $($wgsl:ident => $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl Overrides for $name {
            const DECLARED: &'static [(&'static str, Scalar)] =
                &[$((stringify!($wgsl), <$ty as WgslScalar>::SCALAR)),*];
            fn values(&self) -> Vec<(&'static str, u32)> {
                vec![$((stringify!($wgsl), OverrideValue::word(self.$field))),*]
            }
        }
    };
}

/// Declares a kernel's uniform struct, field for field its WGSL struct (padding left out).
macro_rules! kernel_params {
    (
        $(#[$meta:meta])* $name:ident: $family:ident::$entry:ident,
        $wgsl:ident at binding $binding:literal, overrides $overrides:ty,
        { $($field:ident: $ty:ty),* $(,)? }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl Kernel for $name {
            const FAMILY: Family = Family::$family;
            const ENTRY: &'static str = stringify!($entry);
            const STRUCT: &'static str = stringify!($wgsl);
            const BINDING: u32 = $binding;
            const FIELDS: &'static [Field] = &[$(Field {
                name: stringify!($field),
                offset: std::mem::offset_of!($name, $field),
                scalar: <$ty as WgslScalar>::SCALAR,
            }),*];
            type Overrides = $overrides;
        }
    };
}

overrides! {
    /// conv.wgsl's specialization.
    ConvOverrides {
        ACT => act: Activation,
        INPUT_MODE => input_mode: InputMode,
        KSIZE => ksize: u32,
        RESIDUAL => residual: bool,
        SPLIT_K => split_k: bool,
        STRIDE => stride: u32,
    }
}

overrides! {
    /// The split-K reduction's epilogue.
    ReduceOverrides {
        ACT => act: Activation,
        RESIDUAL => residual: bool,
    }
}

overrides! {
    /// depthwise.wgsl's specialization.
    DepthwiseOverrides {
        ACT => act: Activation,
        KSIZE => ksize: u32,
        STRIDE => stride: u32,
    }
}

overrides! {
    /// The FCs' middle activation: swish for squeeze-excite, relu for scSE.
    ExciteOverrides {
        MID_ACT => mid_act: Activation,
    }
}

overrides! {
    /// How the Winograd input transform reads its input.
    WinogradInputOverrides {
        INPUT_MODE => input_mode: InputMode,
    }
}

overrides! {
    /// The Winograd output transform's epilogue.
    WinogradOutputOverrides {
        ACT => act: Activation,
    }
}

overrides! {
    /// Query positions per alignment workgroup (1 to 4).
    AlignOverrides {
        ROWS => rows: u32,
    }
}

overrides! {
    /// Plain or upsample + concat read in place.
    SpatialGateOverrides {
        INPUT_MODE => input_mode: InputMode,
    }
}

kernel_params! {
    /// Dense conv as an implicit GEMM; `ca`: channels of the upsampled part in the
    /// upsample-concat modes; the weights' rows are `cout_vec4` vec4s.
    ConvParams: Conv::conv2d_nhwc, Params at binding 0, overrides ConvOverrides,
    {
        in_h: u32,
        in_w: u32,
        cin: u32,
        cout: u32,
        out_h: u32,
        out_w: u32,
        pad_top: u32,
        pad_left: u32,
        ca: u32,
        pixel_tiles: u32,
        cout_vec4: u32,
        k_chunk: u32,
        cout_tiles: u32,
        z_per_image: u32,
        w_images: u32,
        w_image_stride: u32,
    }
}

kernel_params! {
    /// Sums a split-K conv's `splits` partial outputs of `elems` values each, then adds the
    /// bias (`cout` channels), the activation and the residual.
    ReduceParams: Conv::split_k_reduce, ReduceParams at binding 10, overrides ReduceOverrides,
    {
        elems: u32,
        cout: u32,
        splits: u32,
    }
}

kernel_params! {
    /// Depthwise conv, four channels per invocation over `total` (pixel, quad) pairs.
    DepthwiseParams: Depthwise::depthwise_nhwc, Params at binding 0, overrides DepthwiseOverrides,
    {
        in_h: u32,
        in_w: u32,
        channels: u32,
        out_h: u32,
        out_w: u32,
        pad_top: u32,
        pad_left: u32,
        channel_quads: u32,
        total: u32,
    }
}

kernel_params! {
    /// Channel means of one part of a (possibly concatenated) input, chunk by chunk.
    ChannelSumParams: SqueezeExcite::channel_sums, SumParams at binding 0, overrides (),
    {
        pixels: u32,
        channels: u32,
        c_off: u32,
        c_total: u32,
        chunk: u32,
        inv_count: f32,
    }
}

kernel_params! {
    /// The first FC (one workgroup per hidden unit) over the summed chunks.
    ExciteHiddenParams: SqueezeExcite::excite_hidden, ExciteParams at binding 3,
    overrides ExciteOverrides,
    {
        channels: u32,
        hidden: u32,
        chunks: u32,
    }
}

kernel_params! {
    /// The second FC and the sigmoid, one invocation per channel.
    ExciteGateParams: SqueezeExcite::excite_gate, ExciteParams at binding 3, overrides (),
    {
        channels: u32,
        hidden: u32,
        chunks: u32,
    }
}

kernel_params! {
    /// scSE spatial gate; `ca` as for the conv.
    SpatialGateParams: Scse::spatial_gate, GateParams at binding 0, overrides SpatialGateOverrides,
    {
        h: u32,
        w: u32,
        cin: u32,
        ca: u32,
        bias: f32,
    }
}

kernel_params! {
    /// scSE output, where it has to be written.
    ScseApplyParams: Scse::apply, ApplyParams at binding 5, overrides (),
    {
        pixels: u32,
        channels: u32,
    }
}

kernel_params! {
    /// The fused alignment over `n` query positions; `shared_keys`: one prompt's keys and
    /// features for every image of a batch.
    AlignParams: Align::soft_align, Params at binding 0, overrides AlignOverrides,
    {
        n: u32,
        cin: u32,
        hidden: u32,
        shared_keys: u32,
    }
}

kernel_params! {
    /// 1x1 conv to one channel + sigmoid.
    HeadParams: Head::head_sigmoid, Params at binding 0, overrides (),
    {
        pixels: u32,
        cin: u32,
        bias: f32,
    }
}

kernel_params! {
    /// Winograd F(4x4, 3x3) input transform: `tiles_h x tiles_w` tiles of 4x4 outputs.
    WinogradInputParams: Winograd::winograd_input, InputParams at binding 0,
    overrides WinogradInputOverrides,
    {
        in_h: u32,
        in_w: u32,
        cin: u32,
        ca: u32,
        tiles_h: u32,
        tiles_w: u32,
        pad_top: u32,
        pad_left: u32,
    }
}

kernel_params! {
    /// Winograd F(4x4, 3x3) output transform over the GEMM's `splits` partial sums.
    WinogradOutputParams: Winograd::winograd_output, OutputParams at binding 6,
    overrides WinogradOutputOverrides,
    {
        out_h: u32,
        out_w: u32,
        cout: u32,
        tiles_h: u32,
        tiles_w: u32,
        splits: u32,
    }
}

kernel_params! {
    /// Storage-type conversion f32 -> `store` (f16) of `elems` values.
    ToStoreParams: Cast::to_store, CastParams at binding 0, overrides (),
    {
        elems: u32,
    }
}

kernel_params! {
    /// Storage-type conversion `store` (f16) -> f32 of `elems` values.
    ToF32Params: Cast::to_f32, CastParams at binding 0, overrides (),
    {
        elems: u32,
    }
}

#[cfg(test)]
mod tests;
