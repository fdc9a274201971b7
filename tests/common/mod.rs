//! Helpers shared by the integration tests: temp dirs, synthetic weights written to disk
//! through the public safetensors writer, synthetic images written as PNG files.
#![allow(dead_code)]

pub mod fixture;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use metauas::io::image::RgbImage8;
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
    metauas::synth::write_state_dict(path, dict, &[]).expect("write synthetic weights");
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
    precision: metauas::graph::Precision,
) -> Option<metauas::model::EngineOptions> {
    let required = std::env::var("METAUAS_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let reason = match metauas::gpu::probe_adapter() {
        None => "no Vulkan/Metal/DX12 adapter".to_string(),
        Some(a) if precision == metauas::graph::Precision::F16 && !a.f16 => {
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

/// CRC-32 (IEEE), as PNG chunks and zip records carry it.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A 45-byte PNG: a valid IHDR claiming `width x height` (8-bit RGB), then IEND.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, body) in [
        (*b"IHDR", {
            let mut b = width.to_be_bytes().to_vec();
            b.extend_from_slice(&height.to_be_bytes());
            b.extend_from_slice(&[8, 2, 0, 0, 0]);
            b
        }),
        (*b"IEND", Vec::new()),
    ] {
        png.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let mut typed = kind.to_vec();
        typed.extend_from_slice(&body);
        png.extend_from_slice(&typed);
        png.extend_from_slice(&crc32(&typed).to_be_bytes());
    }
    png
}
