//! Fused kernels against the unfused ops they replace, on random shapes: a fused kernel
//! reads its input through another op's addressing and must give the very same floats.

use proptest::prelude::*;

use super::isa::Isa;
use super::*;

/// A stride-1 3x3 conv on the 2x nearest upsampling of a `h x w x cin` map.
#[derive(Clone, Debug)]
struct UpsampledConv {
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    /// (top, left, bottom, right) padding of the upsampled map.
    pad: (usize, usize, usize, usize),
    act: Activation,
    residual: bool,
    x: Vec<f32>,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl UpsampledConv {
    fn geometry(&self) -> ConvGeometry {
        let (pt, pl, pb, pr) = self.pad;
        let (in_h, in_w) = (2 * self.h, 2 * self.w);
        ConvGeometry {
            in_h,
            in_w,
            cin: self.cin,
            cout: self.cout,
            kernel: 3,
            stride: 1,
            pad_top: pt,
            pad_left: pl,
            out_h: in_h + pt + pb - 2,
            out_w: in_w + pl + pr - 2,
        }
    }

    fn check(&self) -> Result<(), String> {
        let g = self.geometry();
        let packed = PackedWinograd::pack(&self.weights, self.cout, self.cin);
        let mut up = vec![0.0; g.input_len()];
        upsample::upsample2x_concat_nhwc(&self.x, self.h, self.w, self.cin, None, 0, &mut up);
        let residual: Option<Vec<f32>> = self
            .residual
            .then(|| (0..g.output_len()).map(|i| (i % 7) as f32 - 3.0).collect());
        for isa in Isa::available() {
            let run = |fused: bool| {
                let mut y = vec![f32::NAN; g.output_len()];
                let r = residual.as_deref();
                if fused {
                    winograd::winograd_conv3x3_upsampled_nhwc_isa(
                        isa, &self.x, &g, &packed, &self.bias, self.act, r, &mut y,
                    );
                } else {
                    winograd::winograd_conv3x3_nhwc_isa(
                        isa, &up, &g, &packed, &self.bias, self.act, r, &mut y,
                    );
                }
                y
            };
            let (fused, plain) = (run(true), run(false));
            if fused
                .iter()
                .zip(&plain)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(format!(
                    "{isa:?}: upsampled Winograd differs from upsample + Winograd"
                ));
            }
        }
        Ok(())
    }
}

fn upsampled_conv_strategy() -> impl Strategy<Value = UpsampledConv> {
    (
        (1usize..9, 1usize..9),
        prop_oneof![prop::sample::select(vec![1usize, 16, 17, 64]), 1usize..40],
        prop_oneof![prop::sample::select(vec![1usize, 16, 48]), 1usize..40],
        (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        prop::sample::select(vec![Activation::Identity, Activation::Relu]),
        any::<bool>(),
    )
        .prop_filter(
            "kernel larger than the padded map",
            |((h, w), _, _, p, _, _)| 2 * h + p.0 + p.2 >= 3 && 2 * w + p.1 + p.3 >= 3,
        )
        .prop_flat_map(|((h, w), cin, cout, pad, act, residual)| {
            let data = |n: usize| prop::collection::vec(-1.0f32..1.0, n);
            (data(h * w * cin), data(cout * cin * 9), data(cout)).prop_map(
                move |(x, weights, bias)| UpsampledConv {
                    h,
                    w,
                    cin,
                    cout,
                    pad,
                    act,
                    residual,
                    x,
                    weights,
                    bias,
                },
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn upsampled_winograd_is_upsample_then_winograd(problem in upsampled_conv_strategy()) {
        problem.check().map_err(TestCaseError::fail)?;
    }
}
