//! What a decision costs per query at 256, beside the forward pass it follows, for a
//! 2448 x 2048 camera frame: the verdict and regions (8-connected components at the model's
//! size), the map resized to the frame (OpenCV INTER_LINEAR), the frame-size heatmap,
//! overlay (with region boxes) and mask, each encoded as PNG.
//!
//! `cargo bench --bench decision`. Synthetic weights (the timing does not depend on the
//! values) and a smooth textured frame, segmented once; the peer in the same run is
//! `Engine::segment` with a cached prompt.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use metauas::io::image::RgbImage8;
use metauas::io::output::{
    blend_half, draw_boxes, gray_png_bytes_wh, heatmap_png, heatmap_rgb, rgb_png_bytes,
    threshold_mask, HeatmapScale,
};
use metauas::model::decision::resize_map;
use metauas::synth::{synthetic_image, synthetic_weights, top_half_percent_policy, WeightRecipe};
use metauas::Engine;

const SIZE: usize = 256;
const WIDTH: usize = 2448;
const HEIGHT: usize = 2048;

/// A smooth picture with fine texture, as a 5-megapixel camera sees a part (the frame of
/// `benches/decode.rs`): what PNG compresses in an overlay.
fn camera_frame() -> RgbImage8 {
    metauas::synth::camera_frame(WIDTH, HEIGHT)
}

fn bench_decision(c: &mut Criterion) {
    let engine = Engine::new(&synthetic_weights(&WeightRecipe::unit(1)), SIZE).unwrap();
    let prompt = engine
        .encode_prompt(&synthetic_image(1, WIDTH, HEIGHT, None))
        .unwrap();
    let frame = camera_frame();
    let map = engine.segment(&prompt, &frame).unwrap();
    let policy = top_half_percent_policy(&map.data);
    let decision = policy.decide(&mut map.clone(), (WIDTH, HEIGHT)).unwrap();
    let level = policy.pixel.map_or(0.0, |t| t.value);
    eprintln!("{} regions above {level:.4}", decision.regions.len());
    let big = resize_map(&map.data, SIZE, WIDTH, HEIGHT);
    let heat = heatmap_rgb(&big, HeatmapScale::Fixed);
    let boxes: Vec<[usize; 4]> = decision.regions.iter().map(|r| r.bbox).collect();

    let mut group = c.benchmark_group("decision_256_frame_2448x2048");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(4));
    group.sample_size(10);
    group.bench_function("forward_cached_prompt", |b| {
        b.iter(|| {
            engine
                .segment(black_box(&prompt), black_box(&frame))
                .unwrap()
        })
    });
    group.bench_function("verdict_and_regions", |b| {
        b.iter(|| policy.decide(&mut map.clone(), (WIDTH, HEIGHT)).unwrap())
    });
    group.bench_function("resize_map_to_frame", |b| {
        b.iter(|| resize_map(black_box(&map.data), SIZE, WIDTH, HEIGHT))
    });
    group.bench_function("heatmap_rgb_frame", |b| {
        b.iter(|| heatmap_rgb(black_box(&big), HeatmapScale::Fixed))
    });
    group.bench_function("overlay_with_boxes_frame", |b| {
        b.iter(|| {
            let mut o = blend_half(black_box(&heat), &frame.data);
            draw_boxes(&mut o, WIDTH, HEIGHT, &boxes, [255; 3], WIDTH / 256);
            o
        })
    });
    group.bench_function("png_heatmap_frame", |b| {
        b.iter(|| heatmap_png(black_box(&big), WIDTH, HEIGHT, HeatmapScale::Fixed).unwrap())
    });
    group.bench_function("png_overlay_frame", |b| {
        b.iter(|| rgb_png_bytes(black_box(&frame.data), WIDTH, HEIGHT).unwrap())
    });
    group.bench_function("png_mask_frame", |b| {
        b.iter(|| {
            gray_png_bytes_wh(&threshold_mask(black_box(&big), level), WIDTH, HEIGHT).unwrap()
        })
    });
    // All of `segment`'s frame-size outputs for one query, as it makes them (in memory):
    // resize, overlay with boxes and heatmap + mask encoded on two threads.
    group.bench_function("all_frame_outputs", |b| {
        b.iter(|| {
            let big = resize_map(black_box(&map.data), SIZE, WIDTH, HEIGHT);
            let overlay = || {
                let mut o = blend_half(&heatmap_rgb(&big, HeatmapScale::Fixed), &frame.data);
                draw_boxes(&mut o, WIDTH, HEIGHT, &boxes, [255; 3], WIDTH / 256);
                rgb_png_bytes(&o, WIDTH, HEIGHT).unwrap()
            };
            let rest = || {
                let h = heatmap_png(&big, WIDTH, HEIGHT, HeatmapScale::Fixed).unwrap();
                let m = gray_png_bytes_wh(&threshold_mask(&big, level), WIDTH, HEIGHT).unwrap();
                (h, m)
            };
            rayon::join(overlay, rest)
        })
    });
    group.bench_function("png_heatmap_model_size", |b| {
        b.iter(|| heatmap_png(black_box(&map.data), SIZE, SIZE, HeatmapScale::Fixed).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_decision);
criterion_main!(benches);
