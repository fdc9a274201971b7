//! Kernel benchmarks at MetaUAS's real shapes (S = 256 unless noted).
//!
//! `cargo bench --bench kernels [-- <filter>]`. Throughput is reported in FLOP/s for the
//! compute kernels (criterion's "elem/s" = FLOP/s; 1 multiply-add = 2 FLOPs) and in bytes/s
//! moved for the copy-like ones. `METAUAS_ISA=avx2|portable` benchmarks a lower level.

use std::time::Duration;

use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput,
};
use metauas::cpu::kernels::*;
use metauas::util::rng::SplitMix64;

/// Deterministic data in [-1, 1).
fn data(len: usize, seed: u64) -> Vec<f32> {
    SplitMix64::new(seed).signed_f32s(len)
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    group
}

/// Same-size geometry for stride 1 ("same" padding) or the model's stride-2 padding
/// (k=3: 0 before / 1 after; k=5: 1 before / 2 after).
fn geometry(side: usize, cin: usize, cout: usize, kernel: usize, stride: usize) -> ConvGeometry {
    let pad = if stride == 2 {
        kernel.saturating_sub(2) / 2
    } else {
        kernel / 2
    };
    ConvGeometry {
        in_h: side,
        in_w: side,
        cin,
        cout,
        kernel,
        stride,
        pad_top: pad,
        pad_left: pad,
        out_h: side / stride,
        out_w: side / stride,
    }
}

fn bench_conv(c: &mut Criterion) {
    let shapes = [
        (
            "dec0_conv1_16x16x1216-256_k3",
            geometry(16, 1216, 256, 3, 1),
        ),
        ("dec1_conv1_32x32x368-128_k3", geometry(32, 368, 128, 3, 1)),
        ("dec2_conv1_64x64x160-64_k3", geometry(64, 160, 64, 3, 1)),
        ("dec3_conv1_128x128x112-64_k3", geometry(128, 112, 64, 3, 1)),
        ("dec4_conv2_256x256x48-48_k3", geometry(256, 48, 48, 3, 1)),
        ("stem_256x256x3-48_k3s2", geometry(256, 3, 48, 3, 2)),
        ("enc_pw_128x128x24-144", geometry(128, 24, 144, 1, 1)),
        ("enc_pw_64x64x32-192", geometry(64, 32, 192, 1, 1)),
        ("enc_pw_64x64x192-32", geometry(64, 192, 32, 1, 1)),
        ("enc_pw_16x16x160-960", geometry(16, 160, 960, 1, 1)),
        ("enc_pw_8x8x272-1632", geometry(8, 272, 1632, 1, 1)),
        ("enc_pw_8x8x1632-272", geometry(8, 1632, 272, 1, 1)),
        ("enc_pw_8x8x2688-448", geometry(8, 2688, 448, 1, 1)),
    ];
    let mut group = configure(c, "conv2d");
    for (name, g) in shapes {
        let x = data(g.input_len(), 1);
        let w = data(g.cout * g.cin * g.kernel * g.kernel, 2);
        let bias = data(g.cout, 3);
        let packed = PackedConv::pack(&w, g.cout, g.cin, g.kernel);
        let mut y = vec![0.0; g.output_len()];
        let macs = g.out_h * g.out_w * g.cout * g.cin * g.kernel * g.kernel;
        group.throughput(Throughput::Elements(2 * macs as u64));
        let act = if g.kernel == 1 && g.cout < g.cin {
            Activation::Identity
        } else {
            Activation::Relu
        };
        group.bench_function(name, |b| {
            b.iter(|| conv2d_nhwc(black_box(&x), &g, &packed, &bias, act, None, &mut y))
        });
        // The encoder's expands end in swish (an exp per output): priced separately.
        if g.kernel == 1 && g.cout > g.cin {
            let swish = Activation::Swish;
            group.bench_function(format!("{name}_swish"), |b| {
                b.iter(|| conv2d_nhwc(black_box(&x), &g, &packed, &bias, swish, None, &mut y))
            });
        }
    }
    group.finish();
}

/// The decoder's stride-1 3x3 convs, direct and Winograd side by side (throughput counts
/// the direct convolution's FLOPs for both, so the numbers compare).
fn bench_winograd(c: &mut Criterion) {
    let shapes = [
        ("dec0_conv1_16x16x1216-256", 16, 1216, 256),
        ("dec0_conv1_32x32x1216-256", 32, 1216, 256),
        ("dec0_conv2_16x16x256-256", 16, 256, 256),
        ("dec0_conv2_32x32x256-256", 32, 256, 256),
        ("dec1_conv1_32x32x368-128", 32, 368, 128),
        ("dec1_conv2_32x32x128-128", 32, 128, 128),
        ("dec2_conv1_64x64x160-64", 64, 160, 64),
        ("dec3_conv1_128x128x112-64", 128, 112, 64),
        ("dec4_conv1_256x256x64-48", 256, 64, 48),
        ("dec4_conv2_256x256x48-48", 256, 48, 48),
    ];
    let mut group = configure(c, "conv3x3");
    for (name, side, cin, cout) in shapes {
        let g = geometry(side, cin, cout, 3, 1);
        let x = data(g.input_len(), 1);
        let w = data(g.cout * g.cin * 9, 2);
        let bias = data(g.cout, 3);
        let direct = PackedConv::pack(&w, g.cout, g.cin, 3);
        let wino = PackedWinograd::pack(&w, g.cout, g.cin);
        let mut y = vec![0.0; g.output_len()];
        let macs = g.out_h * g.out_w * g.cout * g.cin * 9;
        group.throughput(Throughput::Elements(2 * macs as u64));
        let act = Activation::Relu;
        group.bench_function(format!("{name}/direct"), |b| {
            b.iter(|| conv2d_nhwc(black_box(&x), &g, &direct, &bias, act, None, &mut y))
        });
        group.bench_function(format!("{name}/winograd"), |b| {
            b.iter(|| conv3x3_winograd_nhwc(black_box(&x), &g, &wino, &bias, act, None, &mut y))
        });
    }
    group.finish();
}

fn bench_depthwise(c: &mut Criterion) {
    let shapes = [
        ("dw_128x128x24_k3s1", geometry(128, 24, 24, 3, 1)),
        ("dw_128x128x48_k3s1", geometry(128, 48, 48, 3, 1)),
        ("dw_128x128x144_k3s2", geometry(128, 144, 144, 3, 2)),
        ("dw_64x64x192_k5s2", geometry(64, 192, 192, 5, 2)),
        ("dw_32x32x336_k3s2", geometry(32, 336, 336, 3, 2)),
        ("dw_32x32x336_k5s1", geometry(32, 336, 336, 5, 1)),
        ("dw_16x16x672_k3s1", geometry(16, 672, 672, 3, 1)),
        ("dw_16x16x960_k5s1", geometry(16, 960, 960, 5, 1)),
        ("dw_8x8x1632_k5s1", geometry(8, 1632, 1632, 5, 1)),
    ];
    let mut group = configure(c, "depthwise");
    for (name, g) in shapes {
        let x = data(g.input_len(), 1);
        let w = data(g.cin * g.kernel * g.kernel, 2);
        let bias = data(g.cin, 3);
        let packed = PackedDepthwise::pack(&w, g.cin, g.kernel);
        let mut y = vec![0.0; g.output_len()];
        group.throughput(Throughput::Bytes(4 * (x.len() + y.len()) as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                depthwise_conv2d_nhwc(black_box(&x), &g, &packed, &bias, Activation::Swish, &mut y)
            })
        });
    }
    group.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut group = configure(c, "attention");
    for (name, side, channels, squeeze) in [
        ("se_128x128x24_sq6", 128, 24, 6),
        ("se_64x64x192_sq8", 64, 192, 8),
        ("se_32x32x336_sq14", 32, 336, 14),
        ("se_16x16x960_sq40", 16, 960, 40),
        ("se_8x8x1632_sq68", 8, 1632, 68),
        ("se_8x8x2688_sq112", 8, 2688, 112),
    ] {
        let pixels = side * side;
        let x = data(pixels * channels, 1);
        let se = SqueezeExcite {
            channels,
            squeeze,
            reduce_w: data(squeeze * channels, 2),
            reduce_b: data(squeeze, 3),
            expand_w: data(channels * squeeze, 4),
            expand_b: data(channels, 5),
        };
        let mut y = vec![0.0; x.len()];
        group.throughput(Throughput::Bytes(12 * x.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| squeeze_excite_nhwc(black_box(&x), pixels, &se, &mut y))
        });
    }
    for (name, side, channels) in [
        ("scse_64x64x160", 64, 160),
        ("scse_128x128x112", 128, 112),
        ("scse_16x16x1216", 16, 1216),
    ] {
        let pixels = side * side;
        let hidden = channels / 16;
        let x = data(pixels * channels, 1);
        let w = Scse {
            channels,
            hidden,
            cse1_w: data(hidden * channels, 2),
            cse1_b: data(hidden, 3),
            cse3_w: data(channels * hidden, 4),
            cse3_b: data(channels, 5),
            sse_w: data(channels, 6),
            sse_b: 0.1,
        };
        let mut y = vec![0.0; x.len()];
        group.throughput(Throughput::Bytes(12 * x.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| scse_nhwc(black_box(&x), pixels, &w, &mut y))
        });
    }
    group.finish();
}

fn bench_align(c: &mut Criterion) {
    let mut group = configure(c, "soft_align");
    for (name, n, cin, hidden) in [
        ("level0_n64_c448_h224", 64, 448, 224),
        ("level1_n256_c160_h80", 256, 160, 80),
        ("level2_n1024_c56_h28", 1024, 56, 28),
        ("s512_level2_n4096_c56_h28", 4096, 56, 28),
    ] {
        let fq = data(n * cin, 1);
        let fp = data(n * cin, 2);
        let q = data(n * hidden, 3);
        let k = data(n * hidden, 4);
        let mut y = vec![0.0; n * 2 * cin];
        group.throughput(Throughput::Elements(2 * (n * n * (hidden + cin)) as u64));
        group.bench_function(name, |b| {
            b.iter(|| soft_align_nhwc(black_box(&fq), &q, &k, &fp, n, cin, hidden, &mut y))
        });
    }
    group.finish();
}

fn bench_upsample(c: &mut Criterion) {
    let mut group = configure(c, "upsample_concat");
    for (name, h, cx, cs) in [
        ("dec0_8x8x896+320", 8, 896, 320),
        ("dec3_64x64x64+48", 64, 64, 48),
        ("dec4_128x128x64", 128, 64, 0),
    ] {
        let x = data(h * h * cx, 1);
        let skip = (cs > 0).then(|| data(4 * h * h * cs, 2));
        let mut y = vec![0.0; 4 * h * h * (cx + cs)];
        group.throughput(Throughput::Bytes(4 * (x.len() + 2 * y.len()) as u64));
        group.bench_function(name, |b| {
            b.iter(|| upsample2x_concat_nhwc(black_box(&x), h, h, cx, skip.as_deref(), cs, &mut y))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_conv,
    bench_winograd,
    bench_depthwise,
    bench_attention,
    bench_align,
    bench_upsample
);
criterion_main!(benches);
