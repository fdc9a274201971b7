//! Fused kernels against the unfused ops they replace, on random shapes: a fused kernel
//! reads its input through another op's addressing and must give the very same floats.

use proptest::prelude::*;

use super::isa::Isa;
use super::*;
use crate::util::rng::SplitMix64;

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

/// The decoder's conv1 input: the scSE of (the 2x upsampling of an `h x w x ca` map,
/// concatenated with a `2h x 2w x cs` skip), read in place by a Winograd conv.
#[derive(Clone, Debug)]
struct GatedConcatConv {
    h: usize,
    w: usize,
    ca: usize,
    cs: usize,
    cout: usize,
    hidden: usize,
    seed: u64,
}

impl GatedConcatConv {
    fn check(&self) -> Result<(), String> {
        let (h, w, ca, cs) = (self.h, self.w, self.ca, self.cs);
        let c = ca + cs;
        let pixels = 4 * h * w;
        let mut rng = SplitMix64::new(self.seed);
        let mut data = |n: usize| rng.signed_f32s(n);
        let x_half = data(h * w * ca);
        let skip = data(pixels * cs);
        let scse = Scse {
            channels: c,
            hidden: self.hidden,
            cse1_w: data(self.hidden * c),
            cse1_b: data(self.hidden),
            cse3_w: data(c * self.hidden),
            cse3_b: data(c),
            sse_w: data(c),
            sse_b: 0.3,
        };
        let weights = data(self.cout * c * 9);
        let bias = data(self.cout);
        let g = ConvGeometry {
            in_h: 2 * h,
            in_w: 2 * w,
            cin: c,
            cout: self.cout,
            kernel: 3,
            stride: 1,
            pad_top: 1,
            pad_left: 1,
            out_h: 2 * h,
            out_w: 2 * w,
        };
        let packed = PackedWinograd::pack(&weights, self.cout, c);
        // Unfused: materialize the concat and the scSE output.
        let mut u = vec![0.0; pixels * c];
        upsample::upsample2x_concat_nhwc(&x_half, h, w, ca, Some(&skip), cs, &mut u);
        let mut v = vec![0.0; pixels * c];
        scse_nhwc(&u, pixels, &scse, &mut v);
        let mut plain = vec![0.0; g.output_len()];
        conv3x3_winograd_nhwc(&v, &g, &packed, &bias, Activation::Relu, None, &mut plain);
        for isa in Isa::available() {
            let (mut cg, mut sg) = (vec![0.0; c], vec![0.0; pixels]);
            attention::scse_gates_upsampled_concat_isa(
                isa,
                &x_half,
                (h, w, ca),
                &skip,
                &scse,
                &mut cg,
                &mut sg,
            );
            let concat = winograd::GatedConcat {
                skip: &skip,
                x_channels: ca,
                channel_gate: &cg,
                spatial_gate: &sg,
            };
            let mut fused = vec![f32::NAN; g.output_len()];
            winograd::winograd_conv3x3_gated_concat_nhwc_isa(
                isa,
                &x_half,
                concat,
                &g,
                &packed,
                &bias,
                Activation::Relu,
                &mut fused,
            );
            // The fused gates sum the channel means and spatial logits in another order
            // (float32 rounding), which the conv carries: held, like the Winograd kernel
            // tests, to 1e-5 of the size of the terms summed (bounded by 9 c max|w| max|v|;
            // the outputs themselves can be far smaller after cancellation).
            let max_abs = |xs: &[f32]| xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = 1.0 + 9.0 * c as f32 * max_abs(&weights) * max_abs(&v);
            for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
                if !a.is_finite() || (a - b).abs() > 1e-5 * scale {
                    return Err(format!("{isa:?} element {i}: fused {a} unfused {b}"));
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gated_concat_winograd_is_upsample_concat_scse_then_winograd(
        (h, w) in (1usize..7, 1usize..7),
        ca in prop::sample::select(vec![16usize, 32, 64]),
        cs in prop_oneof![Just(0usize), 1usize..40],
        cout in 1usize..40,
        hidden in 1usize..9,
        seed in any::<u64>(),
    ) {
        let problem = GatedConcatConv { h, w, ca, cs, cout, hidden, seed };
        problem.check().map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Maps with more tiles than padded output columns: the tile-block schedule (the
    /// small maps above take the by-position one).
    #[test]
    fn gated_concat_winograd_on_tile_blocks(
        (h, w) in (9usize..13, 9usize..13),
        cs in 1usize..20,
        cout in 1usize..17,
        seed in any::<u64>(),
    ) {
        let problem = GatedConcatConv { h, w, ca: 16, cs, cout, hidden: 3, seed };
        problem.check().map_err(TestCaseError::fail)?;
    }
}

/// A case where outputs cancel to well below the terms summed (found by CI's proptest
/// seed when the bound was the largest output).
#[test]
fn gated_concat_with_cancelling_outputs() {
    let problem = GatedConcatConv {
        h: 3,
        w: 4,
        ca: 16,
        cs: 0,
        cout: 19,
        hidden: 3,
        seed: 4_948_424_560_987_480_713,
    };
    problem.check().unwrap();
}

/// An MBConv front: a 1x1 expand conv of an `h x w x cx` map to `ce` channels and the
/// `k x k` depthwise conv (stride `s`) that reads it.
#[derive(Clone, Debug)]
struct ExpandDepthwise {
    h: usize,
    w: usize,
    cx: usize,
    ce: usize,
    k: usize,
    s: usize,
    /// (top, left, bottom, right) padding of the depthwise conv.
    pad: (usize, usize, usize, usize),
    expand_act: Activation,
    act: Activation,
    x: Vec<f32>,
    expand_w: Vec<f32>,
    expand_b: Vec<f32>,
    dw_w: Vec<f32>,
    dw_b: Vec<f32>,
}

impl ExpandDepthwise {
    fn geometry(&self) -> ConvGeometry {
        let (pt, pl, pb, pr) = self.pad;
        ConvGeometry {
            in_h: self.h,
            in_w: self.w,
            cin: self.ce,
            cout: self.ce,
            kernel: self.k,
            stride: self.s,
            pad_top: pt,
            pad_left: pl,
            out_h: (self.h + pt + pb - self.k) / self.s + 1,
            out_w: (self.w + pl + pr - self.k) / self.s + 1,
        }
    }

    /// The fused kernel against the expand conv then the depthwise conv, bit for bit, for
    /// every ISA and on 1, 2 and 3 threads (other task and band cuts).
    fn check(&self) -> Result<(), String> {
        let g = self.geometry();
        let ew = PackedConv::pack(&self.expand_w, self.ce, self.cx, 1);
        let dw = PackedDepthwise::pack(&self.dw_w, self.ce, self.k);
        let eg = ConvGeometry {
            in_h: self.h,
            in_w: self.w,
            cin: self.cx,
            cout: self.ce,
            kernel: 1,
            stride: 1,
            pad_top: 0,
            pad_left: 0,
            out_h: self.h,
            out_w: self.w,
        };
        for isa in Isa::available() {
            let mut expanded = vec![f32::NAN; eg.output_len()];
            let ea = self.expand_act;
            conv::conv2d_nhwc_isa(
                isa,
                &self.x,
                &eg,
                &ew,
                &self.expand_b,
                ea,
                None,
                &mut expanded,
            );
            let mut plain = vec![f32::NAN; g.output_len()];
            depthwise::depthwise_conv2d_nhwc_isa(
                isa, &expanded, &g, &dw, &self.dw_b, self.act, &mut plain,
            );
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut fused = vec![f32::NAN; g.output_len()];
                let expand = mbconv::Expand {
                    w: &ew,
                    bias: &self.expand_b,
                    act: ea,
                };
                pool.install(|| {
                    mbconv::depthwise_over_expand_isa(
                        isa, &self.x, &expand, &g, &dw, &self.dw_b, self.act, &mut fused,
                    )
                });
                if fused
                    .iter()
                    .zip(&plain)
                    .any(|(a, b)| a.to_bits() != b.to_bits())
                {
                    return Err(format!(
                        "{isa:?} on {threads} threads: fused expand + depthwise differs"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn expand_depthwise_strategy() -> impl Strategy<Value = ExpandDepthwise> {
    (
        // Wide rows so that a band holds few of them (the buffer fits ~96K floats).
        (1usize..40, prop_oneof![1usize..12, 300usize..700]),
        prop_oneof![prop::sample::select(vec![1usize, 16, 24]), 1usize..40],
        // At least 2 expanded channels: a 1x1 conv to one channel sums in its own order
        // (`pointwise_to_one_channel`), so such an expand is never folded.
        prop_oneof![prop::sample::select(vec![2usize, 16, 144, 192]), 2usize..50],
        prop::sample::select(vec![
            (3usize, 1usize),
            (3, 2),
            (5, 1),
            (5, 2),
            (1, 1),
            (4, 3),
        ]),
        (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        prop::sample::select(vec![Activation::Swish, Activation::Identity]),
    )
        .prop_filter(
            "kernel larger than the padded map",
            |((h, w), _, _, (k, _), p, _)| h + p.0 + p.2 >= *k && w + p.1 + p.3 >= *k,
        )
        .prop_flat_map(|((h, w), cx, ce, (k, s), pad, act)| {
            let data = |n: usize| prop::collection::vec(-1.0f32..1.0, n);
            (
                data(h * w * cx),
                data(ce * cx),
                data(ce),
                data(ce * k * k),
                data(ce),
            )
                .prop_map(move |(x, expand_w, expand_b, dw_w, dw_b)| ExpandDepthwise {
                    h,
                    w,
                    cx,
                    ce,
                    k,
                    s,
                    pad,
                    expand_act: Activation::Swish,
                    act,
                    x,
                    expand_w,
                    expand_b,
                    dw_w,
                    dw_b,
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn depthwise_over_expand_is_expand_then_depthwise(problem in expand_depthwise_strategy()) {
        problem.check().map_err(TestCaseError::fail)?;
    }
}

/// A squeeze-excite's scaling read through by the 1x1 conv after it: `h x w x cin` input,
/// per-channel gates, `cout` outputs, maybe a residual.
#[derive(Clone, Debug)]
struct GatedPointwise {
    pixels: usize,
    cin: usize,
    cout: usize,
    residual: bool,
    x: Vec<f32>,
    gate: Vec<f32>,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl GatedPointwise {
    /// The gated conv against scaling (the squeeze-excite's own kernel) then the conv, bit for
    /// bit, for every ISA and on 1, 2 and 3 threads.
    fn check(&self) -> Result<(), String> {
        let g = ConvGeometry {
            in_h: 1,
            in_w: self.pixels,
            cin: self.cin,
            cout: self.cout,
            kernel: 1,
            stride: 1,
            pad_top: 0,
            pad_left: 0,
            out_h: 1,
            out_w: self.pixels,
        };
        let packed = PackedConv::pack(&self.weights, self.cout, self.cin, 1);
        let residual: Option<Vec<f32>> = self
            .residual
            .then(|| (0..g.output_len()).map(|i| (i % 5) as f32 - 2.0).collect());
        let r = residual.as_deref();
        for isa in Isa::available() {
            let mut scaled = vec![f32::NAN; self.x.len()];
            attention::scale_channels_isa(isa, &self.x, &self.gate, &mut scaled);
            let mut plain = vec![f32::NAN; g.output_len()];
            conv::conv2d_nhwc_isa(
                isa,
                &scaled,
                &g,
                &packed,
                &self.bias,
                Activation::Identity,
                r,
                &mut plain,
            );
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut gated = vec![f32::NAN; g.output_len()];
                pool.install(|| {
                    conv::conv2d_gated_nhwc_isa(
                        isa,
                        &self.x,
                        Some(&self.gate),
                        &g,
                        &packed,
                        &self.bias,
                        Activation::Identity,
                        r,
                        &mut gated,
                    )
                });
                if gated
                    .iter()
                    .zip(&plain)
                    .any(|(a, b)| a.to_bits() != b.to_bits())
                {
                    return Err(format!("{isa:?} on {threads} threads: gated conv differs"));
                }
            }
        }
        Ok(())
    }
}

fn gated_pointwise_strategy() -> impl Strategy<Value = GatedPointwise> {
    (
        prop_oneof![1usize..40, 380usize..1200],
        prop_oneof![
            prop::sample::select(vec![16usize, 144, 192, 300]),
            1usize..40
        ],
        // At least 2 outputs: a conv to one channel is never gated (another sum order).
        prop_oneof![prop::sample::select(vec![2usize, 24, 32, 48]), 2usize..60],
        any::<bool>(),
    )
        .prop_flat_map(|(pixels, cin, cout, residual)| {
            let data = |n: usize| prop::collection::vec(-1.0f32..1.0, n);
            (
                data(pixels * cin),
                prop::collection::vec(0.0f32..1.0, cin),
                data(cout * cin),
                data(cout),
            )
                .prop_map(move |(x, gate, weights, bias)| GatedPointwise {
                    pixels,
                    cin,
                    cout,
                    residual,
                    x,
                    gate,
                    weights,
                    bias,
                })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gated_pointwise_is_scale_then_conv(problem in gated_pointwise_strategy()) {
        problem.check().map_err(TestCaseError::fail)?;
    }
}
