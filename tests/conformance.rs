//! Conformance against PyTorch: the engine's maps and intermediates versus the float64 truth
//! computed by `tools/reference/make_fixtures.py`, bounded by PyTorch-float32's own error.
//!
//! Bound (issue 2): max abs error and 99.9th-percentile abs error of ours against the truth
//! at most 3x PyTorch-float32's + 1e-5, for the final map and every intermediate.
//! Ours is measured on the fixture's sampled positions; PyTorch's error is taken both as the
//! reference script recorded it over the full tensor (`torch32_error` metadata) and on the
//! same samples, and the bound uses the smaller of the two.

mod common;

use common::fixture::{bundle_name, image_from_meta, Fixture, FIXTURE_TAPS};
use metauas::graph::Precision;
use metauas::io::image::decode_image_file;
use metauas::model::{Engine, EngineOptions, TapTensor};
use serde_json::Value;

const FACTOR: f64 = 3.0;
const SLACK: f64 = 1e-5;

/// Max and 99.9th percentile of absolute errors.
fn error_stats(errors: &mut [f64]) -> (f64, f64) {
    errors.sort_by(|a, b| a.total_cmp(b));
    let n = errors.len();
    let p999 = errors[((n - 1) as f64 * 0.999).round() as usize];
    (errors[n - 1], p999)
}

/// The fixture records fingerprints of the weights and images the reference used; a
/// mismatch means `src/synth.rs` and `tools/reference/synth.py` have drifted apart, or, for
/// the JPEG cases, that our decoder's pixels differ from Pillow's.
fn check_synthetic_inputs(fx: &Fixture, images: &Value) {
    let check = fx.json("synth_check");
    let dict = metauas::synth::synthetic_state_dict(&fx.recipe());
    let mut bits_sum: u128 = 0;
    let mut float_entries = 0;
    for (name, _, t) in &dict {
        if let metauas::synth::SynthTensor::F32(data) = t {
            float_entries += 1;
            bits_sum += data.iter().map(|v| v.to_bits() as u128).sum::<u128>();
            if let Some(fl) = check["entry_first_last_bits"][name.as_str()].as_array() {
                let expected: Vec<u64> = fl.iter().map(|v| v.as_u64().unwrap()).collect();
                let got = [
                    data[0].to_bits() as u64,
                    data[data.len() - 1].to_bits() as u64,
                ];
                assert_eq!(expected, got, "first/last bits of {name}");
            }
        }
    }
    assert_eq!(check["float_entries"].as_u64(), Some(float_entries));
    assert_eq!(
        check["f32_bits_sum"].as_u64().map(u128::from),
        Some(bits_sum),
        "weights differ"
    );
    for (which, key) in [("prompt", "prompt_fnv1a64"), ("query", "query_fnv1a64")] {
        let img = image_from_meta(&images[which]);
        let hash = format!("{:016x}", metauas::synth::fnv1a64(&img.data));
        let expected = check[key]
            .as_str()
            .unwrap()
            .trim_start_matches("0x")
            .to_string();
        assert_eq!(format!("{:0>16}", expected), hash, "{which} image differs");
    }
}

/// f16 storage: the largest error of the map against the truth on every case, sharp ones
/// included (issue 21; the f32 islands of `model::graphs` keep it there), and the
/// 99.9th percentile (issue 3).
const F16_MAX_BOUND: f64 = 1e-2;
const F16_P999_BOUND: f64 = 5e-3;

fn check_fixture(name: &str) {
    check_fixture_on(name, EngineOptions::default());
}

/// Runs `name` with `options`; returns the map's (max, p99.9) error against the truth.
fn check_fixture_on(name: &str, options: EngineOptions) -> (f64, f64) {
    let fx = Fixture::load(name);
    let size: usize = fx.meta["size"].parse().expect("size");
    let dir = common::temp_dir("conformance");
    // Through the public paths: weights from a safetensors file, images from PNG files.
    let weights = dir.join("weights.safetensors");
    common::write_synthetic_weights(&weights, &fx.recipe());
    let images = fx.json("images");
    check_synthetic_inputs(&fx, &images);
    // Synthetic images go through PNG files; the JPEG cases read the corpus's files.
    let decoded = |which: &str| {
        if images[which]["file"].is_string() {
            return image_from_meta(&images[which]);
        }
        let png = dir.join(format!("{which}.png"));
        common::write_png(&png, &image_from_meta(&images[which]));
        decode_image_file(&png).unwrap()
    };

    let engine = Engine::from_file_with(&weights, size, options).expect("engine");
    let f16 = options.precision == Precision::F16;
    let prompt_image = decoded("prompt");
    let query = decoded("query");
    let (map, taps) = engine.segment_with_taps(&prompt_image, &query).unwrap();
    // The production path (its own graphs and arena plans) must give the very same map.
    if checks_production_path(engine.backend_kind(), name) {
        let prompt = engine.encode_prompt(&prompt_image).unwrap();
        let plain = engine.segment(&prompt, &query).unwrap();
        assert_eq!(
            plain.data, map.data,
            "segment() differs from segment_with_taps()"
        );
    }
    let tap_map = taps.iter().find(|t| t.name == "map").expect("map tap");
    assert_eq!(tap_map.data, map.data, "the map tap is not the map");

    println!(
        "{name} on {}: errors vs the float64 truth, max / p99.9: ours (sampled), PyTorch-f32 (full tensor), PyTorch-f32 (sampled)",
        engine.backend_description()
    );
    let mut failures = Vec::new();
    let mut map_error = (0.0, 0.0);
    for tap in FIXTURE_TAPS {
        if !fx.has_tap(tap) {
            continue;
        }
        let TapTensor { data, .. } = taps
            .iter()
            .find(|t| t.name == bundle_name(tap))
            .unwrap_or_else(|| panic!("no tap {}", bundle_name(tap)));
        let (idx, truth, t32) = fx.tap(tap);
        assert_eq!(idx.len(), truth.len());
        let mut ours: Vec<f64> = idx
            .iter()
            .zip(&truth)
            .map(|(&i, t)| (data[i as usize] as f64 - t).abs())
            .collect();
        let mut theirs: Vec<f64> = t32
            .iter()
            .zip(&truth)
            .map(|(&v, t)| (v as f64 - t).abs())
            .collect();
        let (om, op) = error_stats(&mut ours);
        let (sm, sp) = error_stats(&mut theirs);
        let recorded = &fx.json("torch32_error")[tap];
        let tm = recorded["max_abs"].as_f64().expect("torch32_error.max_abs");
        let tp = recorded["p999_abs"]
            .as_f64()
            .expect("torch32_error.p999_abs");
        println!("  {tap:<7} {om:.3e} / {op:.3e}   {tm:.3e} / {tp:.3e}   {sm:.3e} / {sp:.3e}");
        if tap == "map" {
            map_error = (om, op);
        }
        // Both comparisons must hold: with the full-tensor record and on the same samples.
        let (tm, tp) = (tm.min(sm), tp.min(sp));
        if f16 {
            // f16 storage is judged on the map alone (issue 3's bound), not per intermediate.
            if tap == "map" && (om > F16_MAX_BOUND || op > F16_P999_BOUND) {
                failures.push(format!(
                    "map (f16): max {om:.3e} (bound {F16_MAX_BOUND}), p99.9 {op:.3e} (bound {F16_P999_BOUND})"
                ));
            }
        } else if !(om <= FACTOR * tm + SLACK && op <= FACTOR * tp + SLACK) {
            failures.push(format!(
                "{tap}: ours {om:.3e}/{op:.3e} vs PyTorch {tm:.3e}/{tp:.3e}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{name}: outside the bound: {failures:?}"
    );
    map_error
}

/// Whether case `name` also runs the production path and compares its map bit for bit.
/// Always on the CPU (a forward takes a fraction of a second there); on the GPU, which CI
/// runs on lavapipe at ~20 s a forward at 256 and ~4x that at 512, on the sharp 256 cases
/// only: the taps graph and the production graphs come from the same lowering at every size
/// and precision, so one case per precision proves they agree, and the sharp one (softmax
/// near one-hot) is where any difference would show. The other GPU cases still judge their
/// map and every intermediate against the float64 truth.
fn checks_production_path(backend: &str, name: &str) -> bool {
    backend != "gpu" || name == "s256_sharp.safetensors"
}

macro_rules! gpu_fixture_test {
    ($test:ident, $file:expr, $precision:expr) => {
        #[test]
        fn $test() {
            let Some(options) = common::gpu_options(stringify!($test), $precision) else {
                return;
            };
            check_fixture_on($file, options);
        }
    };
}

gpu_fixture_test!(gpu_s256_smooth, "s256_smooth.safetensors", Precision::F32);
gpu_fixture_test!(gpu_s256_sharp, "s256_sharp.safetensors", Precision::F32);
gpu_fixture_test!(gpu_s512_smooth, "s512_smooth.safetensors", Precision::F32);
gpu_fixture_test!(gpu_s512_sharp, "s512_sharp.safetensors", Precision::F32);
gpu_fixture_test!(
    gpu_s256_smooth_jpeg,
    "s256_smooth_jpeg.safetensors",
    Precision::F32
);
gpu_fixture_test!(
    gpu_f16_s256_smooth,
    "s256_smooth.safetensors",
    Precision::F16
);
gpu_fixture_test!(
    gpu_f16_s512_smooth,
    "s512_smooth.safetensors",
    Precision::F16
);
gpu_fixture_test!(gpu_f16_s256_sharp, "s256_sharp.safetensors", Precision::F16);
gpu_fixture_test!(gpu_f16_s512_sharp, "s512_sharp.safetensors", Precision::F16);
gpu_fixture_test!(
    gpu_f16_s256_smooth_jpeg,
    "s256_smooth_jpeg.safetensors",
    Precision::F16
);
gpu_fixture_test!(
    gpu_f16_s512_sharp_jpeg,
    "s512_sharp_jpeg.safetensors",
    Precision::F16
);

#[test]
fn s256_smooth() {
    check_fixture("s256_smooth.safetensors");
}

#[test]
fn s256_sharp() {
    check_fixture("s256_sharp.safetensors");
}

#[test]
fn s512_smooth() {
    check_fixture("s512_smooth.safetensors");
}

#[test]
fn s512_sharp() {
    check_fixture("s512_sharp.safetensors");
}

/// Real-photo inputs: a non-square JPEG prompt and a 1024x768 JPEG query, decoded by Pillow
/// for the reference and by our decoder here (their pixels are checked equal first).
#[test]
fn s256_smooth_jpeg() {
    check_fixture("s256_smooth_jpeg.safetensors");
}

#[test]
fn s512_sharp_jpeg() {
    check_fixture("s512_sharp_jpeg.safetensors");
}
