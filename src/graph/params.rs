//! Parameter types of the ops: what a conv's geometry and fused activation are, and the
//! weights every op reads, by index, from `WeightTables`. Plain data: each backend packs the
//! tables into its own layouts once.

/// Pointwise nonlinearity fused into a kernel's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// `x * sigmoid(x)`.
    Swish,
    Sigmoid,
}

/// Geometry of a conv over an NHWC input. Taps outside the input are zero. Padding at the
/// bottom/right is implied by out_h/out_w (may differ from top/left: the model's stride-2 convs
/// pad 0 before/1 after for k=3, and 1 before/2 after for k=5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_h: usize,
    pub in_w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvGeometry {
    /// Elements of the input tensor.
    pub fn input_len(&self) -> usize {
        self.in_h * self.in_w * self.cin
    }

    /// Elements of the output tensor.
    pub fn output_len(&self) -> usize {
        self.out_h * self.out_w * self.cout
    }
}

/// Declares an index newtype: a value of one table cannot be used for another.
macro_rules! index_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub usize);

        impl $name {
            /// The position in its table.
            pub fn index(self) -> usize {
                self.0
            }
        }

        // Tables are plain vectors indexed by their id type.
        impl<T> std::ops::Index<$name> for Vec<T> {
            type Output = T;
            fn index(&self, id: $name) -> &T {
                &self[id.0]
            }
        }

        impl<T> std::ops::IndexMut<$name> for Vec<T> {
            fn index_mut(&mut self, id: $name) -> &mut T {
                &mut self[id.0]
            }
        }

        impl<T> std::ops::Index<$name> for [T] {
            type Output = T;
            fn index(&self, id: $name) -> &T {
                &self[id.0]
            }
        }

        impl<T> std::ops::IndexMut<$name> for [T] {
            fn index_mut(&mut self, id: $name) -> &mut T {
                &mut self[id.0]
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}
pub(crate) use index_type;

index_type!(
    /// Index of a conv in `WeightTables::convs`.
    ConvId
);
index_type!(
    /// Index of a squeeze-excite in `WeightTables::se`.
    SqueezeExciteId
);
index_type!(
    /// Index of an scSE in `WeightTables::scse`.
    ScseId
);

/// A convolution ready to run: weight `(cout, cin_per_group, k, k)` and a bias (zeros if none).
#[derive(Clone, Debug)]
pub struct ConvWeights {
    pub name: String,
    pub cout: usize,
    pub cin: usize,
    pub kernel: usize,
    pub depthwise: bool,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Squeeze-excite (EfficientNet): `m = mean_hw(x); g = sigmoid(We·swish(Wr·m + br) + be); y = x * g` (per channel).
#[derive(Clone, Debug)]
pub struct SqueezeExciteWeights {
    pub channels: usize,
    pub squeeze: usize,
    /// squeeze x channels, row-major.
    pub reduce_w: Vec<f32>,
    pub reduce_b: Vec<f32>,
    /// channels x squeeze, row-major.
    pub expand_w: Vec<f32>,
    pub expand_b: Vec<f32>,
}

/// scSE (decoder attention): `c = sigmoid(W3·relu(W1·mean_hw(x)+b1)+b3)` per channel;
/// `s = sigmoid(ws·x[p] + bs)` per pixel; `y = x*c + x*s`.
#[derive(Clone, Debug)]
pub struct ScseWeights {
    pub channels: usize,
    pub hidden: usize,
    /// hidden x channels, row-major.
    pub cse1_w: Vec<f32>,
    pub cse1_b: Vec<f32>,
    /// channels x hidden, row-major.
    pub cse3_w: Vec<f32>,
    pub cse3_b: Vec<f32>,
    /// channels.
    pub sse_w: Vec<f32>,
    pub sse_b: f32,
}

/// Every parameter a graph's ops read, addressed by index (`Op::Conv::conv` and so on).
#[derive(Clone, Debug, Default)]
pub struct WeightTables {
    pub convs: Vec<ConvWeights>,
    pub se: Vec<SqueezeExciteWeights>,
    pub scse: Vec<ScseWeights>,
}

/// Storage precision of activations and conv weights on the GPU (accumulation is always
/// f32; the CPU backend is float32 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    /// f16 storage, f32 accumulation; needs the adapter's `SHADER_F16`.
    F16,
}

impl Precision {
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}
