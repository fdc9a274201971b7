//! Helpers shared by the integration tests: temp dirs, synthetic weights written to disk
//! through the public safetensors writer, synthetic images written as PNG files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use metauas::io::image::RgbImage8;
use metauas::io::weights::{write_safetensors, TensorData};
use metauas::synth::{SynthTensor, WeightRecipe};

/// A fresh, empty directory under the system temp dir, unique per process and call.
pub fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("metauas-test-{}-{label}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

pub fn default_recipe(seed: u64) -> WeightRecipe {
    WeightRecipe::unit(seed)
}

/// Writes the synthetic state dict (every official entry, counters as int64) as safetensors.
pub fn write_synthetic_weights(path: &Path, recipe: &WeightRecipe) {
    metauas::synth::write_synthetic_safetensors(path, recipe, &[])
        .expect("write synthetic weights");
}

/// Writes a (possibly edited) synthetic state dict as safetensors.
pub fn write_state_dict(path: &Path, dict: Vec<(String, Vec<usize>, SynthTensor)>) {
    let tensors: Vec<(String, TensorData)> = dict
        .into_iter()
        .map(|(name, shape, t)| {
            let data = match t {
                SynthTensor::F32(data) => TensorData::F32 { shape, data },
                SynthTensor::I64(data) => TensorData::I64 { shape, data },
            };
            (name, data)
        })
        .collect();
    write_safetensors(path, &tensors, &[]).expect("write synthetic weights");
}

pub fn write_png(path: &Path, img: &RgbImage8) {
    image::save_buffer(
        path,
        &img.data,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .expect("write png");
}

/// GPU engine options for a GPU test, or None (with the reason printed) when this machine
/// has no usable adapter. `METAUAS_REQUIRE_GPU=1` turns a missing GPU (or f16 feature) into
/// a failure, so CI cannot pass by skipping.
#[allow(dead_code)]
pub fn gpu_options(
    test: &str,
    precision: metauas::gpu::Precision,
) -> Option<metauas::model::EngineOptions> {
    let required = std::env::var("METAUAS_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let reason = match metauas::gpu::probe_adapter() {
        None => "no Vulkan/Metal/DX12 adapter".to_string(),
        Some(a) if precision == metauas::gpu::Precision::F16 && !a.f16 => {
            format!("{a} has no SHADER_F16")
        }
        Some(_) => {
            return Some(metauas::model::EngineOptions {
                backend: metauas::model::BackendChoice::Gpu,
                precision,
            })
        }
    };
    assert!(!required, "{test}: METAUAS_REQUIRE_GPU=1 but {reason}");
    eprintln!("skipping {test}: {reason} (set METAUAS_REQUIRE_GPU=1 to fail instead)");
    None
}

/// Runs the `metauas` binary built for these tests.
pub fn metauas(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_metauas"))
        .args(args)
        .output()
        .expect("run metauas")
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A failure must be exactly one stderr line, naming `needle`, with a non-zero exit. The line
/// saying which backend runs is information, printed before any work, and is not counted.
pub fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("metauas: backend "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "expected one line, got: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "stderr should name `{needle}`: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "{stderr}"
    );
}
