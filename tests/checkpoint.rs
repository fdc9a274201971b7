//! A real torch.save checkpoint of the full model gives exactly the same map as the
//! safetensors file `metauas convert` makes of it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use metauas::model::Engine;
use metauas::synth::synthetic_image;

#[test]
fn ckpt_and_converted_safetensors_give_identical_maps() {
    let ckpt =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ckpt/metauas_strided.ckpt");
    let dir = common::temp_dir("ckpt");
    let converted = dir.join("converted.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_metauas"))
        .args([
            "convert",
            ckpt.to_str().unwrap(),
            converted.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let prompt = synthetic_image(1, 96, 80, None);
    let query = synthetic_image(2, 70, 100, Some((10, 30, 20)));
    let run = |path: &PathBuf| {
        let engine = Engine::from_file(path, 64).expect("engine");
        let p = engine.encode_prompt(&prompt).unwrap();
        engine.segment(&p, &query).unwrap().data
    };
    let (a, b) = (run(&ckpt), run(&converted));
    assert_eq!(a, b, "ckpt and converted safetensors disagree");
    // The strided weights must still give a map with structure, or the check would be empty.
    let mean = a.iter().map(|v| *v as f64).sum::<f64>() / a.len() as f64;
    let var = a.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
    assert!(a.iter().all(|v| v.is_finite()));
    assert!(var.sqrt() > 1e-4, "degenerate map: std {}", var.sqrt());
    let _ = std::fs::remove_dir_all(&dir);
}
