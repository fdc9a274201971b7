//! Kernel tests against float64 references computed straight from the definitions.
//!
//! Every check runs under every instruction-set level this machine has (portable, AVX2,
//! AVX-512), so all compiled variants are exercised. Tolerances are relative to the size of
//! the terms summed (`sum |w x|`), which is what float32 rounding scales with.

use proptest::prelude::*;

use super::isa::{dispatch_isa, Isa};
use super::winograd::Schedule;
use super::*;
use crate::util::rng::SplitMix64;

fn act_f64(act: Activation, x: f64) -> f64 {
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    match act {
        Activation::Identity => x,
        Activation::Relu => x.max(0.0),
        Activation::Swish => x * sigmoid(x),
        Activation::Sigmoid => sigmoid(x),
    }
}

/// `max |ours - reference| <= tol * (1 + scale)` element-wise, all finite.
fn check(
    what: &str,
    isa: Isa,
    ours: &[f32],
    reference: &[f64],
    scale: &[f64],
    tol: f64,
) -> Result<(), String> {
    assert_eq!(ours.len(), reference.len());
    for (i, ((&o, &r), &s)) in ours.iter().zip(reference).zip(scale).enumerate() {
        let err = (o as f64 - r).abs();
        if !o.is_finite() || err > tol * (1.0 + s) {
            return Err(format!(
                "{what} [{isa:?}] element {i}: ours {o} reference {r} (error {err:.3e}, allowed {:.3e})",
                tol * (1.0 + s)
            ));
        }
    }
    Ok(())
}

const ACTIVATIONS: [Activation; 4] = [
    Activation::Identity,
    Activation::Relu,
    Activation::Swish,
    Activation::Sigmoid,
];

fn activation_strategy() -> impl Strategy<Value = Activation> {
    prop::sample::select(ACTIVATIONS.to_vec())
}

fn channels_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![1usize, 3, 7, 16, 17, 32, 33, 48, 49, 64]),
        1usize..80
    ]
}

// ---------------------------------------------------------------------------------------
// Dense convolution

#[derive(Clone, Debug)]
struct ConvProblem {
    g: ConvGeometry,
    act: Activation,
    residual: bool,
    seed: u64,
}

struct ConvData {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    residual: Option<Vec<f32>>,
}

impl ConvProblem {
    fn data(&self) -> ConvData {
        let g = &self.g;
        let mut rng = SplitMix64::new(self.seed);
        ConvData {
            x: rng.signed_f32s(g.input_len()),
            w: rng.signed_f32s(g.cout * g.cin * g.kernel * g.kernel),
            bias: rng.signed_f32s(g.cout),
            residual: self.residual.then(|| rng.signed_f32s(g.output_len())),
        }
    }

    /// Values and per-element scales (`|bias| + sum |w x| + |residual|`).
    fn reference(&self, d: &ConvData) -> (Vec<f64>, Vec<f64>) {
        let g = &self.g;
        let k = g.kernel;
        let mut values = Vec::with_capacity(g.output_len());
        let mut scales = Vec::with_capacity(g.output_len());
        for oy in 0..g.out_h {
            for ox in 0..g.out_w {
                for co in 0..g.cout {
                    let mut acc = d.bias[co] as f64;
                    let mut scale = acc.abs();
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                            let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                            if iy < 0 || ix < 0 || iy >= g.in_h as isize || ix >= g.in_w as isize {
                                continue;
                            }
                            for ci in 0..g.cin {
                                let xv =
                                    d.x[(iy as usize * g.in_w + ix as usize) * g.cin + ci] as f64;
                                let wv = d.w[((co * g.cin + ci) * k + ky) * k + kx] as f64;
                                acc += xv * wv;
                                scale += (xv * wv).abs();
                            }
                        }
                    }
                    let mut value = act_f64(self.act, acc);
                    if let Some(r) = &d.residual {
                        let rv = r[(oy * g.out_w + ox) * g.cout + co] as f64;
                        value += rv;
                        scale += rv.abs();
                    }
                    values.push(value);
                    scales.push(scale);
                }
            }
        }
        (values, scales)
    }

    fn check(&self) -> Result<(), String> {
        let d = self.data();
        let (reference, scales) = self.reference(&d);
        let packed = PackedConv::pack(&d.w, self.g.cout, self.g.cin, self.g.kernel);
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; self.g.output_len()];
            conv::conv2d_nhwc_isa(
                isa,
                &d.x,
                &self.g,
                &packed,
                &d.bias,
                self.act,
                d.residual.as_deref(),
                &mut y,
            );
            check("conv2d", isa, &y, &reference, &scales, 1e-5)?;
        }
        Ok(())
    }
}

/// How the padding of a random geometry is chosen.
#[derive(Clone, Copy, Debug)]
enum Padding {
    /// `(k - 1) / 2` on every side (stride 1 "same").
    Symmetric,
    /// The model's stride-2 rule: 0 before for k=3, 1 before for k=5, output = ceil(in / 2).
    ModelStride2,
    /// Arbitrary before/after padding in `0..k`.
    Free(usize, usize, usize, usize),
}

fn geometry(
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: Padding,
) -> Option<ConvGeometry> {
    let (pt, pl, pb, pr) = match pad {
        Padding::Symmetric => ((k - 1) / 2, (k - 1) / 2, (k - 1) / 2, (k - 1) / 2),
        Padding::ModelStride2 => {
            let before = if stride == 2 {
                k.saturating_sub(2) / 2
            } else {
                (k - 1) / 2
            };
            let after =
                |n: usize| ((n.div_ceil(stride) - 1) * stride + k).saturating_sub(n + before);
            (before, before, after(h), after(w))
        }
        Padding::Free(a, b, c, d) => (a.min(k - 1), b.min(k - 1), c.min(k - 1), d.min(k - 1)),
    };
    let span_h = h + pt + pb;
    let span_w = w + pl + pr;
    if span_h < k || span_w < k {
        return None;
    }
    Some(ConvGeometry {
        in_h: h,
        in_w: w,
        cin,
        cout,
        kernel: k,
        stride,
        pad_top: pt,
        pad_left: pl,
        out_h: (span_h - k) / stride + 1,
        out_w: (span_w - k) / stride + 1,
    })
}

fn padding_strategy() -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::Symmetric),
        Just(Padding::ModelStride2),
        (0usize..5, 0usize..5, 0usize..5, 0usize..5)
            .prop_map(|(a, b, c, d)| Padding::Free(a, b, c, d)),
    ]
}

fn conv_problem_strategy() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..10, 1usize..10),
        channels_strategy(),
        channels_strategy(),
        prop::sample::select(vec![1usize, 3, 5]),
        1usize..3,
        padding_strategy(),
        activation_strategy(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_filter_map(
            "kernel larger than padded input",
            |((h, w), cin, cout, k, stride, pad, act, residual, seed)| {
                let g = geometry(h, w, cin, cout, k, stride, pad)?;
                Some(ConvProblem {
                    g,
                    act,
                    residual,
                    seed,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn conv2d_matches_reference(problem in conv_problem_strategy()) {
        problem.check().map_err(TestCaseError::fail)?;
    }
}

// ---------------------------------------------------------------------------------------
// Winograd F(4x4, 3x3)

/// Winograd's transforms add a few roundings per output over the direct sum (about 3e-7 of
/// `sum |w x|` observed at cin 300); held to the direct convolution's bound.
const WINOGRAD_TOLERANCE: f64 = 1e-5;

impl ConvProblem {
    fn check_winograd(&self) -> Result<(), String> {
        let d = self.data();
        let (reference, scales) = self.reference(&d);
        let packed = PackedWinograd::pack(&d.w, self.g.cout, self.g.cin);
        let schedules = [
            None,
            Some(Schedule::TileBlocked),
            Some(Schedule::ByPosition),
        ];
        for isa in Isa::available() {
            for schedule in schedules {
                let mut y = vec![f32::NAN; self.g.output_len()];
                winograd::winograd_conv3x3_scheduled(
                    isa,
                    schedule,
                    &d.x,
                    &self.g,
                    &packed,
                    &d.bias,
                    self.act,
                    d.residual.as_deref(),
                    &mut y,
                );
                let name = format!("winograd {schedule:?}");
                check(&name, isa, &y, &reference, &scales, WINOGRAD_TOLERANCE)?;
            }
        }
        Ok(())
    }
}

fn winograd_problem_strategy() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..19, 1usize..19),
        channels_strategy(),
        channels_strategy(),
        prop_oneof![
            Just(Padding::Symmetric),
            (0usize..3, 0usize..3, 0usize..3, 0usize..3)
                .prop_map(|(a, b, c, d)| Padding::Free(a, b, c, d)),
        ],
        activation_strategy(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_filter_map(
            "kernel larger than padded input",
            |((h, w), cin, cout, pad, act, residual, seed)| {
                let g = geometry(h, w, cin, cout, 3, 1, pad)?;
                Some(ConvProblem {
                    g,
                    act,
                    residual,
                    seed,
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn winograd_matches_reference(problem in winograd_problem_strategy()) {
        problem.check_winograd().map_err(TestCaseError::fail)?;
    }
}

fn winograd_case(g: ConvGeometry, act: Activation, residual: bool) {
    let problem = ConvProblem {
        g,
        act,
        residual,
        seed: 11,
    };
    if let Err(e) = problem.check_winograd() {
        panic!("{g:?} {act:?}: {e}");
    }
}

#[test]
fn winograd_tiny_maps_long_reductions_and_parallel_units() {
    let same = |side: usize, cin: usize, cout: usize| ConvGeometry {
        in_h: side,
        in_w: side,
        cin,
        cout,
        kernel: 3,
        stride: 1,
        pad_top: 1,
        pad_left: 1,
        out_h: side,
        out_w: side,
    };
    // 1x1 and 2x2 maps (a tile mostly padding), odd channel counts.
    winograd_case(same(1, 33, 17), Activation::Relu, true);
    winograd_case(same(2, 5, 3), Activation::Identity, false);
    // Channel chunks (cin above the reduction block) and column-group units.
    winograd_case(same(6, 300, 300), Activation::Identity, true);
    winograd_case(same(5, 530, 40), Activation::Relu, false);
    // Few tiles, many channels (dec0's by-position schedule, picked by shape): channel
    // chunks, a ragged map, an odd cout with partial column groups.
    winograd_case(same(7, 600, 90), Activation::Relu, true);
    winograd_case(same(8, 1216, 256), Activation::Relu, false);
    // Many tiles: parallel tile blocks, ragged right and bottom tiles.
    winograd_case(same(45, 40, 72), Activation::Relu, false);
    let g = ConvGeometry {
        in_h: 37,
        in_w: 29,
        cin: 64,
        cout: 48,
        kernel: 3,
        stride: 1,
        pad_top: 1,
        pad_left: 1,
        out_h: 37,
        out_w: 29,
    };
    winograd_case(g, Activation::Swish, true);
}

fn conv_case(g: ConvGeometry, act: Activation, residual: bool) {
    let problem = ConvProblem {
        g,
        act,
        residual,
        seed: 7,
    };
    if let Err(e) = problem.check() {
        panic!("{g:?} {act:?}: {e}");
    }
}

#[test]
fn pointwise_to_one_channel_mask_head() {
    // The mask head's shape (1x1, 48 -> 1) on a map above one task's pixels, and odd
    // channel counts around the vector width, with residual.
    for (side, cin, residual) in [(70, 48, false), (9, 17, true), (5, 3, true), (3, 40, false)] {
        let g = ConvGeometry {
            in_h: side,
            in_w: side,
            cin,
            cout: 1,
            kernel: 1,
            stride: 1,
            pad_top: 0,
            pad_left: 0,
            out_h: side,
            out_w: side,
        };
        conv_case(g, Activation::Sigmoid, residual);
    }
}

#[test]
fn model_padding_stride2_k3_and_k5() {
    // k=3: 0 before, 1 after; k=5: 1 before, 2 after; output = input / 2.
    for (k, pad) in [(3, 0), (5, 1)] {
        for side in [8usize, 9, 1] {
            let out = side.div_ceil(2);
            let g = ConvGeometry {
                in_h: side,
                in_w: side,
                cin: 5,
                cout: 19,
                kernel: k,
                stride: 2,
                pad_top: pad,
                pad_left: pad,
                out_h: out,
                out_w: out,
            };
            conv_case(g, Activation::Swish, false);
        }
    }
}

#[test]
fn one_by_one_spatial_maps() {
    for k in [1, 3, 5] {
        let g = ConvGeometry {
            in_h: 1,
            in_w: 1,
            cin: 33,
            cout: 17,
            kernel: k,
            stride: 1,
            pad_top: k / 2,
            pad_left: k / 2,
            out_h: 1,
            out_w: 1,
        };
        conv_case(g, Activation::Relu, true);
    }
}

#[test]
fn long_reduction_is_split_into_blocks() {
    // cin above the reduction block length (split channels) and small cin with many taps.
    for (cin, k) in [(300, 1), (300, 3), (600, 1), (40, 5), (100, 3)] {
        let g = ConvGeometry {
            in_h: 3,
            in_w: 5,
            cin,
            cout: 35,
            kernel: k,
            stride: 1,
            pad_top: k / 2,
            pad_left: k / 2,
            out_h: 3,
            out_w: 5,
        };
        conv_case(g, Activation::Identity, true);
    }
}

#[test]
fn parallel_units_by_pixels_and_by_groups() {
    // Many pixels: split by pixel blocks.
    let g = ConvGeometry {
        in_h: 21,
        in_w: 19,
        cin: 40,
        cout: 72,
        kernel: 3,
        stride: 1,
        pad_top: 1,
        pad_left: 1,
        out_h: 21,
        out_w: 19,
    };
    conv_case(g, Activation::Relu, false);
    // Few pixels, big weights: split by column groups.
    let g = ConvGeometry {
        in_h: 6,
        in_w: 8,
        cin: 300,
        cout: 300,
        kernel: 3,
        stride: 1,
        pad_top: 1,
        pad_left: 1,
        out_h: 6,
        out_w: 8,
    };
    conv_case(g, Activation::Identity, true);
    // Stride 2, k=5, model padding, wide output.
    let g = ConvGeometry {
        in_h: 30,
        in_w: 26,
        cin: 24,
        cout: 144,
        kernel: 5,
        stride: 2,
        pad_top: 1,
        pad_left: 1,
        out_h: 15,
        out_w: 13,
    };
    conv_case(g, Activation::Swish, false);
}

#[test]
fn every_activation_and_residual() {
    for act in ACTIVATIONS {
        for residual in [false, true] {
            let g = ConvGeometry {
                in_h: 4,
                in_w: 7,
                cin: 20,
                cout: 50,
                kernel: 3,
                stride: 1,
                pad_top: 1,
                pad_left: 1,
                out_h: 4,
                out_w: 7,
            };
            conv_case(g, act, residual);
        }
    }
}

#[test]
fn large_inputs_saturate_activations_without_nan() {
    let g = ConvGeometry {
        in_h: 3,
        in_w: 3,
        cin: 16,
        cout: 16,
        kernel: 1,
        stride: 1,
        pad_top: 0,
        pad_left: 0,
        out_h: 3,
        out_w: 3,
    };
    let packed = PackedConv::pack(&[1.0; 16 * 16], 16, 16, 1);
    let bias = [0.0; 16];
    // Every output is 16 * (+-1e4) = +-1.6e5.
    let cases = [
        (Activation::Sigmoid, 1.0, 1.0),
        (Activation::Sigmoid, -1.0, 0.0),
        (Activation::Swish, 1.0, 1.6e5),
        (Activation::Swish, -1.0, 0.0),
    ];
    for isa in Isa::available() {
        for (act, sign, expected) in cases {
            let x = vec![sign * 1e4; g.input_len()];
            let mut y = vec![f32::NAN; g.output_len()];
            conv::conv2d_nhwc_isa(isa, &x, &g, &packed, &bias, act, None, &mut y);
            for &v in &y {
                assert!(
                    (v - expected).abs() <= 1e-5 * (1.0 + expected),
                    "{isa:?} {act:?} {sign}: {v} vs {expected}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Depthwise convolution

#[derive(Clone, Debug)]
struct DepthwiseProblem {
    g: ConvGeometry,
    act: Activation,
    seed: u64,
}

impl DepthwiseProblem {
    fn check(&self) -> Result<(), String> {
        let g = &self.g;
        let c = g.cin;
        let k = g.kernel;
        let mut rng = SplitMix64::new(self.seed);
        let x = rng.signed_f32s(g.input_len());
        let w = rng.signed_f32s(c * k * k);
        let bias = rng.signed_f32s(c);
        let mut reference = Vec::new();
        let mut scales = Vec::new();
        for oy in 0..g.out_h {
            for ox in 0..g.out_w {
                for ch in 0..c {
                    let mut acc = bias[ch] as f64;
                    let mut scale = acc.abs();
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                            let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                            if iy < 0 || ix < 0 || iy >= g.in_h as isize || ix >= g.in_w as isize {
                                continue;
                            }
                            let term = x[(iy as usize * g.in_w + ix as usize) * c + ch] as f64
                                * w[(ch * k + ky) * k + kx] as f64;
                            acc += term;
                            scale += term.abs();
                        }
                    }
                    reference.push(act_f64(self.act, acc));
                    scales.push(scale);
                }
            }
        }
        let packed = PackedDepthwise::pack(&w, c, k);
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; g.output_len()];
            depthwise::depthwise_conv2d_nhwc_isa(isa, &x, g, &packed, &bias, self.act, &mut y);
            check("depthwise", isa, &y, &reference, &scales, 1e-5)?;
        }
        Ok(())
    }
}

fn depthwise_problem_strategy() -> impl Strategy<Value = DepthwiseProblem> {
    (
        (1usize..14, 1usize..14),
        prop_oneof![
            prop::sample::select(vec![1usize, 7, 16, 17, 48, 64, 65, 100, 144]),
            1usize..130
        ],
        prop::sample::select(vec![3usize, 5]),
        1usize..3,
        padding_strategy(),
        activation_strategy(),
        any::<u64>(),
    )
        .prop_filter_map(
            "kernel larger than padded input",
            |((h, w), c, k, stride, pad, act, seed)| {
                let g = geometry(h, w, c, c, k, stride, pad)?;
                Some(DepthwiseProblem { g, act, seed })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn depthwise_matches_reference(problem in depthwise_problem_strategy()) {
        problem.check().map_err(TestCaseError::fail)?;
    }
}

#[test]
fn depthwise_model_shapes_in_parallel() {
    // k3 s2 (0 before / 1 after), k5 s2 (1 / 2), k5 s1 and k3 s1, large enough to split rows.
    for (side, c, k, stride, pad) in [
        (32, 144, 3, 2, 0),
        (24, 192, 5, 2, 1),
        (16, 160, 5, 1, 2),
        (40, 48, 3, 1, 1),
        // Small maps with many channels and channel tails.
        (8, 1001, 5, 1, 2),
        (16, 680, 3, 2, 0),
        (12, 1632, 3, 1, 1),
    ] {
        let out = if stride == 2 { side / 2 } else { side };
        let g = ConvGeometry {
            in_h: side,
            in_w: side,
            cin: c,
            cout: c,
            kernel: k,
            stride,
            pad_top: pad,
            pad_left: pad,
            out_h: out,
            out_w: out,
        };
        let problem = DepthwiseProblem {
            g,
            act: Activation::Swish,
            seed: 3,
        };
        if let Err(e) = problem.check() {
            panic!("{g:?}: {e}");
        }
    }
}

#[test]
fn depthwise_channel_tails_of_every_length_on_tiny_maps() {
    // Channel counts with 0 and 1 full blocks of 16 and every tail length 1..=15 (the
    // masked-lane path), on maps from 1x1 up, for every fixed kernel and stride.
    for c in 1..=33 {
        for (k, stride, pad) in [
            (3, 1, Padding::Symmetric),
            (3, 2, Padding::ModelStride2),
            (5, 1, Padding::Symmetric),
            (5, 2, Padding::ModelStride2),
        ] {
            for (h, w) in [(1, 1), (2, 3), (7, 9)] {
                let Some(g) = geometry(h, w, c, c, k, stride, pad) else {
                    continue;
                };
                let problem = DepthwiseProblem {
                    g,
                    act: ACTIVATIONS[c % ACTIVATIONS.len()],
                    seed: c as u64,
                };
                if let Err(e) = problem.check() {
                    panic!("{g:?}: {e}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Squeeze-excite and scSE

fn mean_f64(x: &[f32], pixels: usize, c: usize) -> Vec<f64> {
    let mut m = vec![0.0; c];
    for p in 0..pixels {
        for ch in 0..c {
            m[ch] += x[p * c + ch] as f64;
        }
    }
    m.iter().map(|s| s / pixels as f64).collect()
}

fn matvec_f64(w: &[f32], b: &[f32], x: &[f64], act: Activation) -> Vec<f64> {
    let cols = x.len();
    b.iter()
        .enumerate()
        .map(|(r, &bias)| {
            let dot: f64 = (0..cols).map(|c| w[r * cols + c] as f64 * x[c]).sum();
            act_f64(act, dot + bias as f64)
        })
        .collect()
}

fn check_squeeze_excite(
    pixels: usize,
    channels: usize,
    squeeze: usize,
    seed: u64,
) -> Result<(), String> {
    let mut rng = SplitMix64::new(seed);
    let x: Vec<f32> = rng
        .signed_f32s(pixels * channels)
        .iter()
        .map(|v| v + 0.3)
        .collect();
    let se = SqueezeExcite {
        channels,
        squeeze,
        reduce_w: rng.signed_f32s(squeeze * channels),
        reduce_b: rng.signed_f32s(squeeze),
        expand_w: rng.signed_f32s(channels * squeeze),
        expand_b: rng.signed_f32s(channels),
    };
    let m = mean_f64(&x, pixels, channels);
    let s = matvec_f64(&se.reduce_w, &se.reduce_b, &m, Activation::Swish);
    let gate = matvec_f64(&se.expand_w, &se.expand_b, &s, Activation::Sigmoid);
    let reference: Vec<f64> = (0..pixels * channels)
        .map(|i| x[i] as f64 * gate[i % channels])
        .collect();
    let scales: Vec<f64> = x.iter().map(|v| v.abs() as f64).collect();
    for isa in Isa::available() {
        let mut y = vec![f32::NAN; x.len()];
        attention::squeeze_excite_nhwc_isa(isa, &x, pixels, &se, &mut y);
        check("squeeze-excite", isa, &y, &reference, &scales, 1e-5)?;
    }
    Ok(())
}

fn check_scse(pixels: usize, channels: usize, hidden: usize, seed: u64) -> Result<(), String> {
    let mut rng = SplitMix64::new(seed);
    let x: Vec<f32> = rng
        .signed_f32s(pixels * channels)
        .iter()
        .map(|v| v - 0.2)
        .collect();
    let w = Scse {
        channels,
        hidden,
        cse1_w: rng.signed_f32s(hidden * channels),
        cse1_b: rng.signed_f32s(hidden),
        cse3_w: rng.signed_f32s(channels * hidden),
        cse3_b: rng.signed_f32s(channels),
        sse_w: rng.signed_f32s(channels),
        sse_b: rng.next_signed_f32(),
    };
    let m = mean_f64(&x, pixels, channels);
    let z = matvec_f64(&w.cse1_w, &w.cse1_b, &m, Activation::Relu);
    let cgate = matvec_f64(&w.cse3_w, &w.cse3_b, &z, Activation::Sigmoid);
    let mut reference = Vec::new();
    let mut scales = Vec::new();
    for p in 0..pixels {
        let row = &x[p * channels..][..channels];
        let dot: f64 = row
            .iter()
            .zip(&w.sse_w)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        let dot_scale: f64 = row
            .iter()
            .zip(&w.sse_w)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        let s = act_f64(Activation::Sigmoid, dot + w.sse_b as f64);
        for (ch, &v) in row.iter().enumerate() {
            reference.push(v as f64 * cgate[ch] + v as f64 * s);
            scales.push(v.abs() as f64 * (2.0 + dot_scale));
        }
    }
    for isa in Isa::available() {
        let mut y = vec![f32::NAN; x.len()];
        attention::scse_nhwc_isa(isa, &x, pixels, &w, &mut y);
        check("scSE", isa, &y, &reference, &scales, 1e-5)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn squeeze_excite_matches_reference(pixels in 1usize..600, channels in channels_strategy(), squeeze in 1usize..20, seed in any::<u64>()) {
        check_squeeze_excite(pixels, channels, squeeze, seed).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn scse_matches_reference(pixels in 1usize..600, channels in channels_strategy(), hidden in 1usize..8, seed in any::<u64>()) {
        check_scse(pixels, channels, hidden, seed).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn squeeze_excite_and_scse_model_shapes() {
    // Squeeze 1 (the model's smallest), large maps (parallel passes, chunked sums).
    check_squeeze_excite(64 * 64, 144, 1, 1).unwrap();
    check_squeeze_excite(8 * 8, 1632, 68, 2).unwrap();
    // Small maps split by channel blocks (up to 256 pixels), the boundary, odd tails.
    check_squeeze_excite(16 * 16, 960, 40, 6).unwrap();
    check_squeeze_excite(257, 960, 40, 7).unwrap();
    check_squeeze_excite(1, 2688, 112, 8).unwrap();
    check_squeeze_excite(3, 1001, 5, 9).unwrap();
    check_squeeze_excite(128 * 128, 24, 6, 10).unwrap();
    check_scse(64 * 64, 160, 10, 3).unwrap();
    check_scse(16 * 16, 1216, 76, 4).unwrap();
    check_scse(5, 17, 1, 5).unwrap();
}

// ---------------------------------------------------------------------------------------
// Soft alignment

fn check_soft_align(
    n: usize,
    cin: usize,
    hidden: usize,
    sharpness: f32,
    seed: u64,
) -> Result<(), String> {
    let mut rng = SplitMix64::new(seed);
    let fq = rng.signed_f32s(n * cin);
    let fp = rng.signed_f32s(n * cin);
    let q: Vec<f32> = rng
        .signed_f32s(n * hidden)
        .iter()
        .map(|v| v * sharpness)
        .collect();
    let k = rng.signed_f32s(n * hidden);
    check_soft_align_data(&fq, &q, &k, &fp, n, cin, hidden)
}

fn check_soft_align_data(
    fq: &[f32],
    q: &[f32],
    k: &[f32],
    fp: &[f32],
    n: usize,
    cin: usize,
    hidden: usize,
) -> Result<(), String> {
    let mut reference = Vec::with_capacity(n * 2 * cin);
    for i in 0..n {
        let qi = &q[i * hidden..][..hidden];
        let logits: Vec<f64> = (0..n)
            .map(|j| {
                qi.iter()
                    .zip(&k[j * hidden..][..hidden])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum()
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let total: f64 = weights.iter().sum();
        reference.extend(fq[i * cin..][..cin].iter().map(|&v| v as f64));
        for c in 0..cin {
            let v: f64 = (0..n)
                .map(|j| weights[j] * fp[j * cin + c] as f64)
                .sum::<f64>();
            reference.push(v / total);
        }
    }
    // Outputs are copies or convex combinations of values in [-1, 1].
    let scales = vec![1.0; reference.len()];
    // The kernel keeps the logits in f64, so even logits in the thousands (sharpness 100)
    // must match the float64 definition to float32 rounding of the output.
    for isa in Isa::available() {
        let mut y = vec![f32::NAN; n * 2 * cin];
        align::soft_align_nhwc_isa(isa, fq, q, k, fp, n, cin, hidden, &mut y);
        check("soft-align", isa, &y, &reference, &scales, 1e-5)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn soft_align_matches_reference(
        n in prop_oneof![1usize..40, 100usize..300],
        cin in channels_strategy(),
        hidden in 1usize..40,
        sharp in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let sharpness = if sharp { 100.0 } else { 1.0 };
        check_soft_align(n, cin, hidden, sharpness, seed).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn soft_align_single_position_copies_the_prompt() {
    check_soft_align(1, 7, 3, 100.0, 9).unwrap();
    let fq = [1.0, 2.0];
    let fp = [3.0, -4.0];
    for isa in Isa::available() {
        let mut y = [0.0; 4];
        align::soft_align_nhwc_isa(isa, &fq, &[1e4], &[-1e4], &fp, 1, 2, 1, &mut y);
        assert_eq!(y, [1.0, 2.0, 3.0, -4.0], "{isa:?}");
    }
}

#[test]
fn soft_align_near_ties_among_logits_in_the_thousands() {
    // Keys nearly equal: logits around 10^4 that differ by O(1), so many keys share the
    // weight. Logits rounded to f32 (ulp 1e-3) would move the output by ~1e-4.
    let (n, cin, hidden) = (24, 9, 28);
    let mut rng = SplitMix64::new(21);
    let base: Vec<f32> = rng
        .signed_f32s(hidden)
        .iter()
        .map(|v| v.signum() * 0.5 + 0.3 * v)
        .collect();
    let k: Vec<f32> = (0..n * hidden)
        .map(|i| base[i % hidden] + 2e-3 * rng.next_signed_f32())
        .collect();
    let q: Vec<f32> = (0..n * hidden)
        .map(|i| 1000.0 * base[i % hidden].signum() + 80.0 * rng.next_signed_f32())
        .collect();
    let (fq, fp) = (rng.signed_f32s(n * cin), rng.signed_f32s(n * cin));
    let logit = |i: usize, j: usize| -> f64 {
        (0..hidden)
            .map(|c| q[i * hidden + c] as f64 * k[j * hidden + c] as f64)
            .sum()
    };
    assert!(
        logit(0, 0) > 1000.0,
        "logits must be in the thousands: {}",
        logit(0, 0)
    );
    check_soft_align_data(&fq, &q, &k, &fp, n, cin, hidden).unwrap();
}

#[test]
fn soft_align_sharp_model_shapes() {
    // Level shapes of the model (S=256 level 0 and 2, trimmed in n), logits in the thousands.
    check_soft_align(64, 448, 224, 100.0, 11).unwrap();
    check_soft_align(400, 56, 28, 100.0, 12).unwrap();
    check_soft_align(257, 160, 80, 1.0, 13).unwrap();
}

// ---------------------------------------------------------------------------------------
// Upsample + concat

fn check_upsample(h: usize, w: usize, cx: usize, cs: usize, with_skip: bool, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let x = rng.signed_f32s(h * w * cx);
    let cs = if with_skip { cs } else { 0 };
    let skip = with_skip.then(|| rng.signed_f32s(4 * h * w * cs));
    let c = cx + cs;
    let mut y = vec![f32::NAN; 4 * h * w * c];
    upsample::upsample2x_concat_nhwc(&x, h, w, cx, skip.as_deref(), cs, &mut y);
    for oy in 0..2 * h {
        for ox in 0..2 * w {
            for ch in 0..c {
                let expected = if ch < cx {
                    x[((oy / 2) * w + ox / 2) * cx + ch]
                } else {
                    skip.as_ref().unwrap()[(oy * 2 * w + ox) * cs + ch - cx]
                };
                assert_eq!(
                    y[(oy * 2 * w + ox) * c + ch],
                    expected,
                    "({oy}, {ox}, {ch}) of {h}x{w} cx {cx} cs {cs}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn upsample_concat_matches_reference(h in 1usize..12, w in 1usize..12, cx in 1usize..40, cs in 1usize..40, with_skip in any::<bool>(), seed in any::<u64>()) {
        check_upsample(h, w, cx, cs, with_skip, seed);
    }
}

#[test]
fn upsample_concat_model_shapes() {
    check_upsample(16, 16, 128, 32, true, 1);
    check_upsample(64, 64, 64, 0, false, 2);
}

// ---------------------------------------------------------------------------------------
// Building blocks

dispatch_isa! {
    fn exp_into(x: &[f32], out: &mut [f32]) => exp_lanes;
}

#[inline(always)]
fn exp_lanes<L: simd::Level>(x: &[f32], out: &mut [f32]) {
    for (xs, os) in x.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        let v = simd::exp::<L>(simd::load_partial::<L>(xs));
        os.copy_from_slice(&L::to_array(v));
    }
}

dispatch_isa! {
    fn masked_copy(src: &[f32], n: usize, loaded: &mut [f32], dst: &mut [f32]) => masked_lanes;
}

/// Load the first `n` lanes of `src` (its end), write all 16 lanes of what was loaded to
/// `loaded`, and store the first `n` lanes to `dst` (also its end).
#[inline(always)]
fn masked_lanes<L: simd::Level>(src: &[f32], n: usize, loaded: &mut [f32], dst: &mut [f32]) {
    assert!(n <= src.len() && n <= dst.len() && loaded.len() == 16);
    // SAFETY: the last n floats of `src` and `dst` exist; `loaded` holds 16.
    unsafe {
        let v = L::load_masked(src.as_ptr().add(src.len() - n), n);
        L::store(loaded.as_mut_ptr(), v);
        L::store_masked(dst.as_mut_ptr().add(dst.len() - n), n, v);
    }
}

#[test]
fn masked_loads_and_stores_touch_only_their_lanes() {
    // The lanes sit at the very end of their vectors, so a read or write past them would be
    // caught by Miri or the allocator's guard; here the values are checked.
    for isa in Isa::available() {
        for n in 0..=16 {
            let src: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
            let mut loaded = vec![f32::NAN; 16];
            let mut dst = vec![-7.0f32; 20];
            masked_copy(isa, &src, n, &mut loaded, &mut dst);
            for (i, &l) in loaded.iter().enumerate() {
                let expected = if i < n { i as f32 + 1.0 } else { 0.0 };
                assert_eq!(l, expected, "{isa:?} n {n} lane {i}");
            }
            for (i, &d) in dst.iter().enumerate() {
                let expected = if i >= 20 - n {
                    (i + n - 20) as f32 + 1.0
                } else {
                    -7.0
                };
                assert_eq!(d, expected, "{isa:?} n {n} dst {i}");
            }
        }
    }
}

#[test]
fn exp_is_accurate_on_every_level() {
    let mut x: Vec<f32> = (0..16 * 800).map(|i| -87.0 + i as f32 * 0.0137).collect();
    x.extend([
        f32::NAN,
        -1e30,
        1e30,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1.0,
        -1.0,
    ]);
    x.resize(x.len().next_multiple_of(16), 0.5);
    for isa in Isa::available() {
        let mut out = vec![0.0; x.len()];
        exp_into(isa, &x, &mut out);
        let mut worst: f64 = 0.0;
        for (&xi, &o) in x.iter().zip(&out) {
            if xi.is_finite() && xi.abs() < 87.0 {
                let truth = (xi as f64).exp();
                worst = worst.max(((o as f64 - truth) / truth).abs());
            }
        }
        assert!(worst < 5e-7, "{isa:?}: worst relative error {worst:e}");
        let special = &out[16 * 800..16 * 800 + 8];
        assert!(special[0].is_nan(), "{isa:?}: exp(NaN) = {}", special[0]);
        assert!(
            special[1] >= 0.0 && special[1] < 1e-37,
            "{isa:?}: exp(-1e30) = {}",
            special[1]
        );
        assert!(
            special[2].is_finite() && special[2] > 1e38,
            "{isa:?}: exp(1e30) = {}",
            special[2]
        );
        assert!(
            special[3] >= 0.0 && special[3] < 1e-37,
            "{isa:?}: exp(-inf) = {}",
            special[3]
        );
        for (got, want) in
            special[4..8]
                .iter()
                .zip([1.0, 1.0, std::f32::consts::E, 1.0 / std::f32::consts::E])
        {
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "{isa:?}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn public_entry_points_use_the_selected_level() {
    let g = ConvGeometry {
        in_h: 5,
        in_w: 6,
        cin: 7,
        cout: 20,
        kernel: 3,
        stride: 1,
        pad_top: 1,
        pad_left: 1,
        out_h: 5,
        out_w: 6,
    };
    let mut rng = SplitMix64::new(5);
    let (x, w, bias) = (
        rng.signed_f32s(g.input_len()),
        rng.signed_f32s(20 * 7 * 9),
        rng.signed_f32s(20),
    );
    let packed = PackedConv::pack(&w, 20, 7, 3);
    let (mut ours, mut direct) = (vec![0.0; g.output_len()], vec![1.0; g.output_len()]);
    conv2d_nhwc(&x, &g, &packed, &bias, Activation::Swish, None, &mut ours);
    conv::conv2d_nhwc_isa(
        Isa::selected(),
        &x,
        &g,
        &packed,
        &bias,
        Activation::Swish,
        None,
        &mut direct,
    );
    assert_eq!(ours, direct);
}

#[test]
fn isa_levels_are_detected_and_ordered() {
    let levels = Isa::available();
    assert_eq!(levels[0], Isa::Portable);
    assert_eq!(*levels.last().unwrap(), Isa::detected());
    assert!(Isa::selected() <= Isa::detected());
}
