//! A camera frame's way in: decode a 2448 x 2048 JPEG and PNG, then the MetaUAS
//! pre-processing (resize + normalization) to 256 and 512.
//!
//! `cargo bench --bench decode`. The frames are made here (a smooth picture with fine
//! texture, as a 5-megapixel camera sees a part), JPEG at quality 90 4:2:0 and PNG, both
//! written by the `image` crate, so the same file runs against any decoder.

use std::io::Cursor;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use metauas::io::image::{decode_image_bytes, preprocess};

const WIDTH: u32 = 2448;
const HEIGHT: u32 = 2048;

fn frame() -> image::RgbImage {
    image::RgbImage::from_fn(WIDTH, HEIGHT, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let texture = ((x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 13) % 9;
        image::Rgb([
            (60.0 + 120.0 * fx / WIDTH as f32) as u8 + texture as u8,
            (80.0 + 100.0 * fy / HEIGHT as f32) as u8 + texture as u8,
            (128.0 + 60.0 * (fx / 150.0).sin() * (fy / 110.0).cos()) as u8,
        ])
    })
}

fn encoded(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    if format == image::ImageFormat::Jpeg {
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
        enc.encode_image(img).expect("jpeg");
    } else {
        img.write_to(&mut out, format).expect("encode");
    }
    out.into_inner()
}

fn bench_frames(c: &mut Criterion) {
    let img = frame();
    let mut group = c.benchmark_group("frame_2448x2048");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(4));
    group.sample_size(10);
    for (name, format) in [
        ("jpeg", image::ImageFormat::Jpeg),
        ("png", image::ImageFormat::Png),
    ] {
        let bytes = encoded(&img, format);
        eprintln!("{name}: {} bytes", bytes.len());
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| decode_image_bytes(black_box(&bytes), name).unwrap())
        });
        let decoded = decode_image_bytes(&bytes, name).unwrap();
        for size in [256, 512] {
            group.bench_function(format!("preprocess_{name}_{size}"), |b| {
                b.iter(|| preprocess(black_box(&decoded), size))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_frames);
criterion_main!(benches);
