//! Every GPU kernel against the CPU backend on random shapes, odd ones included (channels
//! that are not a multiple of 4, 1x1 maps, k = 5, stride-2 asymmetric padding). The CPU
//! kernels are themselves checked against naive float64 references (src/cpu/kernels/tests.rs).
//!
//! Each case is a tiny graph run by both backends through the real lowering, so the fused
//! paths are what is tested: squeeze-excite folded into the projection conv, upsample +
//! concat + scSE gates folded into the next conv's input addressing.

mod common;

use metauas::cpu::CpuBackend;
use metauas::gpu::GpuBackend;
use metauas::graph::Precision;
use metauas::graph::{
    Activation, Backend, ConvId, ConvWeights, Graph, GraphBuilder, ScseId, ScseWeights, Shape,
    SqueezeExciteId, SqueezeExciteWeights, WeightTables,
};
use metauas::util::rng::SplitMix64;
use proptest::prelude::*;

/// Deterministic values in [-scale, scale).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.next_signed_f32() * scale).collect()
}

fn conv_weights(seed: u64, cout: usize, cin: usize, k: usize, depthwise: bool) -> ConvWeights {
    let fan_in = if depthwise { k * k } else { cin * k * k };
    let per_out = if depthwise { 1 } else { cin };
    ConvWeights {
        name: format!("conv{seed}"),
        cout,
        cin: per_out,
        kernel: k,
        depthwise,
        weight: values(seed, cout * per_out * k * k, 1.7 / (fan_in as f32).sqrt()),
        bias: values(seed + 1, cout, 0.3),
    }
}

fn se_weights(seed: u64, channels: usize, squeeze: usize) -> SqueezeExciteWeights {
    SqueezeExciteWeights {
        channels,
        squeeze,
        reduce_w: values(seed, squeeze * channels, 1.0 / (channels as f32).sqrt()),
        reduce_b: values(seed + 1, squeeze, 0.2),
        expand_w: values(seed + 2, channels * squeeze, 1.0 / (squeeze as f32).sqrt()),
        expand_b: values(seed + 3, channels, 0.2),
    }
}

fn scse_weights(seed: u64, channels: usize, hidden: usize) -> ScseWeights {
    ScseWeights {
        channels,
        hidden,
        cse1_w: values(seed, hidden * channels, 1.0 / (channels as f32).sqrt()),
        cse1_b: values(seed + 1, hidden, 0.2),
        cse3_w: values(seed + 2, channels * hidden, 1.0 / (hidden as f32).sqrt()),
        cse3_b: values(seed + 3, channels, 0.2),
        sse_w: values(seed + 4, channels, 1.0 / (channels as f32).sqrt()),
        sse_b: 0.1,
    }
}

/// Runs `graph` on both backends and compares every output: |gpu - cpu| <= tol * (1 + |cpu|).
fn compare(test: &str, weights: &WeightTables, graph: &Graph, inputs: &[Vec<f32>], tol: f32) {
    let Some(_) = common::gpu_options(test, Precision::F32) else {
        return;
    };
    let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
    let cpu = CpuBackend::new(weights).compile(graph).expect("CPU graph");
    let wants = cpu.run(&refs, None).expect("CPU run");
    let gpu = GpuBackend::new(weights, Precision::F32).expect("GPU backend");
    let program = gpu.compile(graph).expect("GPU program");
    let got = program.run(&refs, None).expect("GPU run");
    for (o, want) in wants.iter().enumerate() {
        assert_eq!(got[o].len(), want.len(), "{test}: output {o} length");
        for (i, (g, c)) in got[o].iter().zip(want).enumerate() {
            let bound = tol * (1.0 + c.abs());
            assert!(
                (g - c).abs() <= bound,
                "{test}: output {o} [{i}]: gpu {g} vs cpu {c}"
            );
        }
    }
}

fn activation(i: usize) -> Activation {
    [
        Activation::Identity,
        Activation::Relu,
        Activation::Swish,
        Activation::Sigmoid,
    ][i % 4]
}

/// The model's padding: "same" at stride 1, TF-style static-same (asymmetric) at stride 2.
fn padding(k: usize, stride: usize) -> (usize, usize) {
    if stride == 1 || k == 1 {
        (k / 2, k / 2)
    } else {
        ((k - 2) / 2, (k - 2) / 2 + 1)
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 16,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Dense conv (implicit GEMM; the 1x1 GEMM and the one-channel head included) with
    /// bias, activation and a residual when the shapes allow one.
    #[test]
    fn conv_matches_cpu(
        h in 1usize..14, w in 1usize..14, cin in 1usize..70, cout in 1usize..70,
        k in prop::sample::select(vec![1usize, 3, 5]), stride in 1usize..3,
        act in 0usize..4, seed in 0u64..1000,
    ) {
        // The model's stride-2 padding assumes at least 2 pixels per side.
        let (h, w) = (h.max(stride), w.max(stride));
        let mut weights = WeightTables::default();
        weights.convs.push(conv_weights(seed, cout, cin, k, false));
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(h, w, cin));
        let residual = (stride == 1 && cin == cout && act == 0).then_some(x);
        let y = g.conv("y", x, ConvId(0), (cout, k, stride), padding(k, stride), false, activation(act), residual);
        g.output(y);
        let inputs = vec![values(seed + 7, h * w * cin, 1.0)];
        compare("conv_matches_cpu", &weights, &g.finish(), &inputs, 2e-5);
    }

    /// Small maps with long reductions (the decoder's first convs): the reduction is split
    /// across workgroups (split-K) and summed by a second pass with the epilogue.
    #[test]
    fn split_k_conv_matches_cpu(
        h in 1usize..8, w in 1usize..8, cin in 100usize..400, cout in 1usize..140,
        k in prop::sample::select(vec![1usize, 3]), act in 0usize..4, seed in 0u64..1000,
    ) {
        let mut weights = WeightTables::default();
        weights.convs.push(conv_weights(seed, cout, cin, k, false));
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(h, w, cin));
        let r = g.input("r", Shape::new(h, w, cout));
        let residual = (act == 0).then_some(r);
        let y = g.conv("y", x, ConvId(0), (cout, k, 1), padding(k, 1), false, activation(act), residual);
        g.output(y);
        let inputs = vec![values(seed + 7, h * w * cin, 1.0), values(seed + 8, h * w * cout, 1.0)];
        compare("split_k_conv_matches_cpu", &weights, &g.finish(), &inputs, 2e-5);
    }

    /// Depthwise 3x3 / 5x5 at stride 1 and 2 with the model's asymmetric padding.
    #[test]
    fn depthwise_matches_cpu(
        h in 1usize..20, w in 1usize..20, c in 1usize..70,
        k in prop::sample::select(vec![3usize, 5]), stride in 1usize..3,
        act in 0usize..4, seed in 0u64..1000,
    ) {
        let (h, w) = (h.max(stride), w.max(stride));
        let mut weights = WeightTables::default();
        weights.convs.push(conv_weights(seed, c, c, k, true));
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(h, w, c));
        let y = g.conv("y", x, ConvId(0), (c, k, stride), padding(k, stride), true, activation(act), None);
        g.output(y);
        let inputs = vec![values(seed + 7, h * w * c, 1.0)];
        compare("depthwise_matches_cpu", &weights, &g.finish(), &inputs, 2e-5);
    }

    /// Squeeze-excite (channel means, the two FCs) folded into the following 1x1 projection.
    #[test]
    fn squeeze_excite_into_projection_matches_cpu(
        h in 1usize..40, w in 1usize..40, c in 1usize..90, squeeze in 1usize..12,
        cout in 1usize..40, seed in 0u64..1000,
    ) {
        let mut weights = WeightTables::default();
        weights.se.push(se_weights(seed, c, squeeze));
        weights.convs.push(conv_weights(seed + 11, cout, c, 1, false));
        let mut g = GraphBuilder::new();
        let x = g.input("x", Shape::new(h, w, c));
        let s = g.squeeze_excite("se", x, SqueezeExciteId(0));
        let y = g.conv("y", s, ConvId(0), (cout, 1, 1), (0, 0), false, Activation::Identity, None);
        g.output(y);
        let inputs = vec![values(seed + 7, h * w * c, 2.0)];
        compare("squeeze_excite_into_projection_matches_cpu", &weights, &g.finish(), &inputs, 2e-5);
    }

    /// A decoder block: upsample x2 + concat (with or without a skip), scSE gates folded into
    /// the 3x3 conv's input, then scSE materialized on the conv output.
    #[test]
    fn decoder_block_matches_cpu(
        h in 1usize..10, w in 1usize..10, ca in 1usize..40, cs in 0usize..30,
        cout in 1usize..40, seed in 0u64..1000,
    ) {
        let with_skip = cs > 0;
        let c = ca + cs;
        let mut weights = WeightTables::default();
        weights.convs.push(conv_weights(seed, cout, c, 3, false));
        weights.scse.push(scse_weights(seed + 20, c, c.div_ceil(16)));
        weights.scse.push(scse_weights(seed + 30, cout, cout.div_ceil(16)));
        let mut g = GraphBuilder::new();
        let a = g.input("a", Shape::new(h, w, ca));
        let skip = with_skip.then(|| g.input("skip", Shape::new(2 * h, 2 * w, cs)));
        let up = g.upsample_concat("up", a, skip);
        let x = if with_skip { g.scse("att1", up, ScseId(0)) } else { up };
        let y = g.conv("conv", x, ConvId(0), (cout, 3, 1), (1, 1), false, Activation::Relu, None);
        let z = g.scse("att2", y, ScseId(1));
        g.output(z);
        let mut inputs = vec![values(seed + 7, h * w * ca, 1.0)];
        if with_skip {
            inputs.push(values(seed + 8, 4 * h * w * cs, 1.0));
        }
        compare("decoder_block_matches_cpu", &weights, &g.finish(), &inputs, 2e-5);
    }

    /// The fused alignment (online softmax), with logits large enough that a naive softmax
    /// would overflow.
    #[test]
    fn align_matches_cpu(
        h in 1usize..12, w in 1usize..12, cin in 1usize..80, hidden in 1usize..48,
        logit_scale in prop::sample::select(vec![0.1f32, 1.0, 30.0]), seed in 0u64..1000,
    ) {
        let n = h * w;
        let weights = WeightTables::default();
        let mut g = GraphBuilder::new();
        let fq = g.input("fq", Shape::new(h, w, cin));
        let q = g.input("q", Shape::new(h, w, hidden));
        let k = g.input("k", Shape::new(h, w, hidden));
        let fp = g.input("fp", Shape::new(h, w, cin));
        let y = g.align("y", fq, q, k, fp);
        g.output(y);
        let inputs = vec![
            values(seed, n * cin, 1.0),
            values(seed + 1, n * hidden, logit_scale),
            values(seed + 2, n * hidden, logit_scale),
            values(seed + 3, n * cin, 1.0),
        ];
        // Sharp softmaxes amplify f32 logit rounding (the CPU computes logits in f64).
        let tol = if logit_scale > 1.0 { 2e-3 } else { 2e-5 };
        compare("align_matches_cpu", &weights, &g.finish(), &inputs, tol);
    }
}

/// 3x3 stride-1 convs over maps of at least `WINOGRAD_MIN_PIXELS` outputs run as Winograd
/// F(4x4, 3x3) (input transform, 36 GEMMs, output transform): plain input with odd channels
/// and a map that is not a multiple of the 4x4 tile, and the decoder's upsample + concat +
/// scSE read in place, with split-K in the GEMM (many input channels).
#[test]
fn winograd_convs_match_cpu() {
    let test = "winograd_convs_match_cpu";
    // (h, w) of the low-resolution input, channels upsampled, skip channels, cout.
    for (h, w, ca, cs, cout, seed) in [(33, 34, 13, 0, 7, 1), (32, 35, 70, 150, 9, 2)] {
        let c = ca + cs;
        let mut weights = WeightTables::default();
        weights.convs.push(conv_weights(seed, cout, c, 3, false));
        weights
            .scse
            .push(scse_weights(seed + 20, c, c.div_ceil(16)));
        let mut g = GraphBuilder::new();
        let (x, inputs) = if cs == 0 {
            // Plain: the input at full size, 66x68 (not a multiple of 4 in one side).
            let x = g.input("x", Shape::new(2 * h, 2 * w, ca));
            (x, vec![values(seed + 7, 4 * h * w * ca, 1.0)])
        } else {
            let a = g.input("a", Shape::new(h, w, ca));
            let skip = g.input("skip", Shape::new(2 * h, 2 * w, cs));
            let up = g.upsample_concat("up", a, Some(skip));
            let x = g.scse("att1", up, ScseId(0));
            let inputs = vec![
                values(seed + 7, h * w * ca, 1.0),
                values(seed + 8, 4 * h * w * cs, 1.0),
            ];
            (x, inputs)
        };
        let act = Activation::Relu;
        let y = g.conv("conv", x, ConvId(0), (cout, 3, 1), (1, 1), false, act, None);
        g.output(y);
        assert!(4 * h * w >= metauas::gpu::WINOGRAD_MIN_PIXELS);
        let graph = g.finish();
        compare(test, &weights, &graph, &inputs, 1e-4);
        if common::gpu_options(test, Precision::F32).is_some() {
            let gpu = GpuBackend::new(&weights, Precision::F32).unwrap();
            let shape = gpu.compile(&graph).unwrap().dispatch_shape().unwrap();
            let kernels: Vec<&str> = shape.iter().map(|d| d.kernel).collect();
            assert!(kernels.contains(&"winograd_input"), "{kernels:?}");
            assert!(kernels.contains(&"winograd_output"), "{kernels:?}");
        }
    }
}

/// The alignment with 2 and 4 query positions per workgroup (chosen from n: 561 and 1073
/// positions), the last workgroup with fewer rows than the rest, sharp and smooth.
#[test]
fn align_with_several_rows_per_workgroup_matches_cpu() {
    for (h, w, cin, hidden, scale) in [(33, 17, 57, 20, 30.0), (37, 29, 24, 13, 1.0)] {
        let n: usize = h * w;
        let mut g = GraphBuilder::new();
        let fq = g.input("fq", Shape::new(h, w, cin));
        let q = g.input("q", Shape::new(h, w, hidden));
        let k = g.input("k", Shape::new(h, w, hidden));
        let fp = g.input("fp", Shape::new(h, w, cin));
        let y = g.align("y", fq, q, k, fp);
        g.output(y);
        let inputs = vec![
            values(1, n * cin, 1.0),
            values(2, n * hidden, scale),
            values(3, n * hidden, scale),
            values(4, n * cin, 1.0),
        ];
        let tol = if scale > 1.0 { 2e-3 } else { 2e-5 };
        let test = "align_with_several_rows_per_workgroup_matches_cpu";
        compare(test, &WeightTables::default(), &g.finish(), &inputs, tol);
    }
}

/// The synthetic weights of the engine-level tests: sharp alignment, a decoder and head
/// with gains that keep the map away from saturation (queries differ visibly).
fn engine_recipe(seed: u64) -> metauas::synth::WeightRecipe {
    metauas::synth::WeightRecipe {
        gain_alignment: 14.0,
        gain_decoder: 1.5,
        gain_head: 4.0,
        ..metauas::synth::WeightRecipe::unit(seed)
    }
}

/// `segment_batch` (one submission for several queries on the GPU; two queries at a time on
/// the CPU, five here so the odd one out runs alone) gives each query the map `segment`
/// gives it, bit for bit, on both backends; queries differ so a mix-up would show.
#[test]
fn batched_queries_match_one_by_one() {
    use metauas::model::Engine;
    use metauas::synth::{synthetic_image, synthetic_weights};
    let weights = synthetic_weights(&engine_recipe(5));
    let prompt_image = synthetic_image(1, 70, 64, None);
    // Five: on the CPU two pairs (two runs at a time) and one alone; on the GPU one batch.
    let queries: Vec<_> = (0..5)
        .map(|i| synthetic_image(10 + i, 64, 72, Some((8 + 9 * i as usize, 20, 10))))
        .collect();
    let refs: Vec<_> = queries.iter().collect();
    let mut options = vec![metauas::model::EngineOptions::default()];
    // On the GPU: one forward with a batch dimension (the prompt stored once), f32 and f16.
    for precision in [Precision::F32, Precision::F16] {
        options.extend(common::gpu_options(
            "batched_queries_match_one_by_one",
            precision,
        ));
    }
    for opts in options {
        let engine = Engine::with_options(&weights, 64, opts).unwrap();
        let prompt = engine.encode_prompt(&prompt_image).unwrap();
        let batch = engine.segment_batch(&prompt, &refs).unwrap();
        assert_eq!(batch.len(), queries.len());
        for (q, b) in queries.iter().zip(&batch) {
            let single = engine.segment(&prompt, q).unwrap();
            assert_eq!(single.data, b.data, "{}", engine.backend_description());
        }
        assert_ne!(batch[0].data, batch[1].data);
        assert_ne!(batch[0].data, batch[3].data);
        assert!(engine.segment_batch(&prompt, &[]).unwrap().is_empty());
        // The same query twice in a batch, beside another one: each map is its own.
        let again = engine
            .segment_batch(&prompt, &[&queries[3], &queries[3], &queries[0]])
            .unwrap();
        assert_eq!(again[0].data, batch[3].data);
        assert_eq!(again[1].data, batch[3].data);
        assert_eq!(again[2].data, batch[0].data);
        // A batch whose runs share every input.
        let same = engine
            .segment_batch(&prompt, &[&queries[1], &queries[1]])
            .unwrap();
        assert!(same.iter().all(|m| m.data == batch[1].data));
        // A query pre-processed elsewhere (e.g. on another thread) gives the same map.
        let input = metauas::io::image::preprocess(&queries[2], 64);
        let pre = engine.segment_preprocessed(&prompt, &input).unwrap();
        assert_eq!(pre.data, batch[2].data);
        let err = engine
            .segment_preprocessed(&prompt, &input[1..])
            .unwrap_err();
        assert!(err.to_string().contains("takes 12288"), "{err}");
    }
}

/// The CPU backend's maps do not depend on how many threads run it: every kernel splits
/// its reductions by shape alone (a replica with 16 cores gives a 2-core replica's bits).
/// At 128 the late maps are small enough for the blocked squeeze-excite (whose old
/// per-thread blocks made this fail: "prompt features differ on 2 threads"). The channel
/// means' old thread-dependent join changed an f64 sum's order, which rarely shows in the
/// f32 mean; they are split by shape now too, which this test alone does not prove.
#[test]
fn cpu_maps_do_not_depend_on_the_thread_count() {
    use metauas::model::Engine;
    use metauas::synth::{synthetic_image, synthetic_weights};
    let weights = synthetic_weights(&engine_recipe(8));
    let engine = Engine::with_options(&weights, 128, Default::default()).unwrap();
    let prompt_image = synthetic_image(3, 128, 128, None);
    let query = synthetic_image(4, 120, 136, Some((40, 60, 16)));
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let prompt = engine.encode_prompt(&prompt_image).unwrap();
            let map = engine.segment(&prompt, &query).unwrap();
            (prompt.tensors, map.data)
        })
    };
    let one = on(1);
    for threads in [2, 3, 5] {
        let other = on(threads);
        assert!(
            one.0 == other.0,
            "prompt features differ on {threads} threads"
        );
        assert!(one.1 == other.1, "map differs on {threads} threads");
    }
}

/// `segment_pair` (on the CPU: both encoders at once; on the GPU: one submission) gives the prompt features and map that
/// `encode_prompt` then `segment` give, bit for bit, on both backends, also when the arenas
/// were left dirty by other runs in between.
#[test]
fn paired_prompt_and_query_match_separate_calls() {
    use metauas::model::Engine;
    use metauas::synth::{synthetic_image, synthetic_weights};
    let weights = synthetic_weights(&engine_recipe(6));
    let prompts = [
        synthetic_image(1, 70, 64, None),
        synthetic_image(3, 64, 64, None),
    ];
    let queries = [
        synthetic_image(10, 64, 72, Some((8, 20, 10))),
        synthetic_image(11, 80, 64, Some((30, 12, 9))),
    ];
    let mut options = vec![metauas::model::EngineOptions::default()];
    // On the GPU one submission hands the features over on the device; under f16 storage
    // some are converted there (f16 features into the float32 alignment).
    for precision in [Precision::F32, Precision::F16] {
        options.extend(common::gpu_options(
            "paired_prompt_and_query_match_separate_calls",
            precision,
        ));
    }
    for opts in options {
        let engine = Engine::with_options(&weights, 64, opts).unwrap();
        for (p, q) in prompts.iter().zip(&queries) {
            let (features, map) = engine.segment_pair(p, q).unwrap();
            if let Some(phases) = engine.last_query_phases() {
                assert_eq!(phases.submits, 1, "segment_pair on the GPU");
            }
            let expected_features = engine.encode_prompt(p).unwrap();
            let expected_map = engine.segment(&expected_features, q).unwrap();
            assert_eq!(features.tensors, expected_features.tensors);
            assert_eq!(
                map.data,
                expected_map.data,
                "{}",
                engine.backend_description()
            );
            // The returned features are a usable prompt.
            assert_eq!(engine.segment(&features, q).unwrap().data, map.data);
        }
        let (_, a) = engine.segment_pair(&prompts[0], &queries[0]).unwrap();
        let (_, b) = engine.segment_pair(&prompts[1], &queries[1]).unwrap();
        assert_ne!(a.data, b.data);
    }
}

/// Under f16 storage, nodes marked full precision run and store in float32: a precise conv
/// gives the float32 program's output bit for bit (a conv in f16 would be off by ~1e-3),
/// and values crossing into and out of the f16 region are converted (the chain's end stays
/// within f16 rounding of the CPU).
#[test]
fn full_precision_nodes_stay_float32_under_f16_storage() {
    let test = "full_precision_nodes_stay_float32_under_f16_storage";
    let Some(_) = common::gpu_options(test, Precision::F16) else {
        return;
    };
    let (h, w, c) = (9, 7, 13);
    let weights = WeightTables {
        convs: (0..3)
            .map(|i| conv_weights(40 + i, c, c, 3, false))
            .collect(),
        ..WeightTables::default()
    };
    let mut g = GraphBuilder::new();
    let x = g.input("x", Shape::new(h, w, c));
    let conv = |g: &mut GraphBuilder, name: &str, x, i| {
        let act = Activation::Swish;
        g.conv(name, x, ConvId(i), (c, 3, 1), (1, 1), false, act, None)
    };
    g.set_full_precision(true);
    let a = conv(&mut g, "a", x, 0);
    g.set_full_precision(false);
    let b = conv(&mut g, "b", a, 1);
    g.set_full_precision(true);
    let y = conv(&mut g, "y", b, 2);
    for v in [a, b, y] {
        g.output(v);
    }
    let graph = g.finish();
    let input = values(7, h * w * c, 1.0);
    let run = |precision| {
        let gpu = GpuBackend::new(&weights, precision).expect("GPU backend");
        let program = gpu.compile(&graph).expect("GPU program");
        program.run(&[&input], None).expect("GPU run")
    };
    let (wide, narrow) = (run(Precision::F32), run(Precision::F16));
    assert_eq!(narrow[0], wide[0], "the full-precision conv is not float32");
    assert_ne!(narrow[1], wide[1], "the f16 conv is not f16");
    let cpu = CpuBackend::new(&weights).compile(&graph).unwrap();
    let want = cpu.run(&[&input], None).unwrap();
    for (o, tol) in [(1, 4e-3), (2, 8e-3)] {
        for (got, c) in narrow[o].iter().zip(&want[o]) {
            assert!(
                (got - c).abs() <= tol * (1.0 + c.abs()),
                "output {o}: {got} vs {c}"
            );
        }
    }
}
