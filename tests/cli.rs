//! The `metauas` command-line contract: outputs, JSON lines, and one-line errors for bad input.

mod common;

use common::{assert_one_line_error, metauas, s};

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use metauas::graph::Precision;
use metauas::io::output::read_npy_f32;
use metauas::synth::synthetic_image;

/// Shared inputs: synthetic weights and two PNG images, written once per test process.
struct Inputs {
    dir: PathBuf,
    weights: PathBuf,
    prompt: PathBuf,
    query: PathBuf,
}

fn inputs() -> &'static Inputs {
    static INPUTS: OnceLock<Inputs> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = common::temp_dir("cli");
        let weights = dir.join("weights.safetensors");
        common::write_synthetic_weights(&weights, &common::default_recipe(3));
        let prompt = dir.join("good.png");
        let query = dir.join("frame.png");
        common::write_png(&prompt, &synthetic_image(1, 90, 70, None));
        common::write_png(&query, &synthetic_image(2, 80, 64, Some((20, 20, 16))));
        Inputs {
            dir,
            weights,
            prompt,
            query,
        }
    })
}

#[test]
fn segment_writes_map_heatmap_overlay_and_json() {
    let i = inputs();
    let out_dir = common::temp_dir("cli-out");
    let second = i.dir.join("second.png");
    common::write_png(&second, &synthetic_image(5, 64, 64, None));
    let out = metauas(&[
        "segment",
        "--weights",
        s(&i.weights),
        "--prompt",
        s(&i.prompt),
        "--query",
        s(&i.query),
        "--query",
        s(&second),
        "--size",
        "64",
        "--out",
        s(&out_dir),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let queries = [(&i.query, "frame", (80, 64)), (&second, "second", (64, 64))];
    for (line, (query, stem, frame)) in lines.iter().zip(queries) {
        assert_eq!(line["query"], s(query));
        assert_eq!(line["prompt"], s(&i.prompt));
        let npy = out_dir.join(format!("{stem}.npy"));
        assert_eq!(line["map"], s(&npy));
        assert!(line["ms"].as_f64().unwrap() > 0.0);
        let (shape, data) = read_npy_f32(&npy).unwrap();
        assert_eq!(shape, vec![64, 64]);
        assert!(data.iter().all(|v| *v > 0.0 && *v < 1.0));
        let max = data.iter().copied().fold(f32::MIN, f32::max);
        assert!((line["score"].as_f64().unwrap() - max as f64).abs() < 1e-6);
        // Pictures at the query's own size by default (`--output-size original`).
        for suffix in ["heatmap", "overlay"] {
            let png = image::open(out_dir.join(format!("{stem}_{suffix}.png"))).unwrap();
            assert_eq!((png.width(), png.height()), frame);
        }
    }
}

#[test]
fn info_reports_entries_parameters_and_arena() {
    let i = inputs();
    let out = metauas(&["info", "--weights", s(&i.weights)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("entries: 820"), "{stdout}");
    assert!(stdout.contains("parameters: 22,130,305"), "{stdout}");
    assert!(stdout.contains("arena peak"), "{stdout}");
}

/// `metauas segment` with one query.
fn segment(weights: &str, prompt: &str, query: &str, size: &str, out: &str) -> Output {
    metauas(&[
        "segment",
        "--weights",
        weights,
        "--prompt",
        prompt,
        "--query",
        query,
        "--size",
        size,
        "--out",
        out,
    ])
}

#[test]
fn missing_files_are_named() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    let missing = i.dir.join("nope.png");
    let out = segment(s(&i.weights), s(&missing), s(&i.query), "64", s(&o));
    assert_one_line_error(&out, "nope.png");
    let out = segment(s(&i.weights), s(&i.prompt), s(&missing), "64", s(&o));
    assert_one_line_error(&out, "nope.png");
    let missing_w = i.dir.join("nope.safetensors");
    let out = segment(s(&missing_w), s(&i.prompt), s(&i.query), "64", s(&o));
    assert_one_line_error(&out, "nope.safetensors");
}

#[test]
fn undecodable_image_is_named() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    let bad = i.dir.join("garbage.png");
    std::fs::write(&bad, b"this is not an image").unwrap();
    let out = segment(s(&i.weights), s(&bad), s(&i.query), "64", s(&o));
    assert_one_line_error(&out, "garbage.png");
    let out = segment(s(&i.weights), s(&i.prompt), s(&bad), "64", s(&o));
    assert_one_line_error(&out, "garbage.png");
}

#[test]
fn truncated_and_garbled_weights_are_named() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    let bytes = std::fs::read(&i.weights).unwrap();
    let truncated = i.dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = segment(s(&truncated), s(&i.prompt), s(&i.query), "64", s(&o));
    assert_one_line_error(&out, "truncated.safetensors");
    let garbled = i.dir.join("garbled.ckpt");
    std::fs::write(&garbled, b"PK\x03\x04 definitely not a zip archive").unwrap();
    let out = segment(s(&garbled), s(&i.prompt), s(&i.query), "64", s(&o));
    assert_one_line_error(&out, "garbled.ckpt");
}

#[test]
fn wrong_shape_names_entry_and_shapes() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    let path = i.dir.join("wrong_shape.safetensors");
    let mut dict = metauas::synth::synthetic_state_dict(&common::default_recipe(3));
    let entry = dict.iter_mut().find(|e| e.0 == "mask_head.weight").unwrap();
    entry.1 = vec![1, 24, 2, 1];
    common::write_state_dict(&path, dict);
    let out = segment(s(&path), s(&i.prompt), s(&i.query), "64", s(&o));
    assert_one_line_error(&out, "mask_head.weight");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[1, 24, 2, 1]") && err.contains("[1, 48, 1, 1]"),
        "{err}"
    );
}

#[test]
fn bad_sizes_are_refused() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    for size in ["100", "0", "4096"] {
        let out = segment(s(&i.weights), s(&i.prompt), s(&i.query), size, s(&o));
        assert_one_line_error(&out, size);
    }
}

#[test]
fn duplicate_query_stems_get_mirrored_output_names() {
    let i = inputs();
    let o = common::temp_dir("cli-dup");
    let sub = i.dir.join("dup/sub");
    std::fs::create_dir_all(&sub).unwrap();
    let first = i.dir.join("dup/frame.png");
    std::fs::copy(&i.query, &first).unwrap();
    let twin = sub.join("frame.jpg");
    std::fs::copy(&i.query, &twin).unwrap();
    let out = metauas(&[
        "segment",
        "--weights",
        s(&i.weights),
        "--prompt",
        s(&i.prompt),
        "--query",
        s(&first),
        "--query",
        s(&twin),
        "--size",
        "64",
        "--out",
        s(&o),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(o.join("frame.npy").is_file());
    assert!(o.join("sub/frame.npy").is_file());
}

#[test]
fn usage_errors_are_one_line() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    for size in ["abc", "-32"] {
        let out = metauas(&[
            "segment",
            "--weights",
            s(&i.weights),
            "--prompt",
            s(&i.prompt),
            "--query",
            s(&i.query),
            "--out",
            s(&o),
            &format!("--size={size}"),
        ]);
        assert_one_line_error(&out, size);
        assert_eq!(out.status.code(), Some(2));
    }
    // The library says what is wrong with the size; the CLI names the flag it came from.
    let out = metauas(&["info", "--weights", s(&i.weights), "--size", "250"]);
    assert_one_line_error(
        &out,
        "--size 250: size 250 is not a positive multiple of 32",
    );
    let out = metauas(&[
        "segment",
        "--weights",
        s(&i.weights),
        "--prompt",
        s(&i.prompt),
    ]);
    assert_one_line_error(&out, "--query");
}

#[test]
fn directory_query_without_images_is_named() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    let empty = i.dir.join("no-images");
    std::fs::create_dir_all(&empty).unwrap();
    let out = segment(s(&i.weights), s(&i.prompt), s(&empty), "64", s(&o));
    assert_one_line_error(&out, "no image files");
}

#[test]
fn non_finite_weights_are_refused() {
    let i = inputs();
    let o = common::temp_dir("cli-err");
    let path = i.dir.join("nan.safetensors");
    let mut dict = metauas::synth::synthetic_state_dict(&common::default_recipe(3));
    let entry = dict
        .iter_mut()
        .find(|e| e.0 == "decoder.blocks.2.conv1.0.weight")
        .unwrap();
    if let metauas::synth::SynthTensor::F32(data) = &mut entry.2 {
        data[17] = f32::NAN;
    }
    common::write_state_dict(&path, dict);
    let out = segment(s(&path), s(&i.prompt), s(&i.query), "64", s(&o));
    assert_one_line_error(&out, "decoder.blocks.2.conv1.0.weight");
}

#[test]
fn outputs_never_overwrite_inputs() {
    let i = inputs();
    let dir = common::temp_dir("cli-clash");
    let query = dir.join("x.png");
    let heat = dir.join("x_heatmap.png");
    std::fs::copy(&i.query, &query).unwrap();
    std::fs::copy(&i.prompt, &heat).unwrap();
    let before = std::fs::read(&heat).unwrap();
    let out = metauas(&[
        "segment",
        "--weights",
        s(&i.weights),
        "--prompt",
        s(&i.prompt),
        "--query",
        s(&query),
        "--query",
        s(&heat),
        "--size",
        "64",
        "--out",
        s(&dir),
    ]);
    assert_one_line_error(&out, "x_heatmap.png");
    assert_eq!(
        std::fs::read(&heat).unwrap(),
        before,
        "an input was overwritten"
    );
}

#[test]
fn defaults_and_json_key_order() {
    let i = inputs();
    let cwd = common::temp_dir("cli-defaults");
    let out = Command::new(env!("CARGO_BIN_EXE_metauas"))
        .args([
            "segment",
            "--weights",
            s(&i.weights),
            "--prompt",
            s(&i.prompt),
            "--query",
            s(&i.query),
        ])
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let keys: Vec<&str> = ["\"query\"", "\"prompt\"", "\"score\"", "\"map\"", "\"ms\""]
        .into_iter()
        .filter(|k| line.contains(k))
        .collect();
    assert_eq!(keys.len(), 5, "{line}");
    let positions: Vec<usize> = keys.iter().map(|k| line.find(k).unwrap()).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "key order: {line}"
    );
    // Default --out is metauas-out (relative to the working directory), default --size 256.
    let (shape, _) = read_npy_f32(&cwd.join("metauas-out/frame.npy")).unwrap();
    assert_eq!(shape, vec![256, 256]);
}

/// `auto` takes a hardware GPU when one exists and the CPU otherwise (lavapipe and other
/// software adapters are slower than our CPU backend), and says which on stderr.
#[test]
fn auto_backend_says_which_it_took() {
    let i = inputs();
    let out_dir = common::temp_dir("cli-auto");
    let out = segment(s(&i.weights), s(&i.prompt), s(&i.query), "64", s(&out_dir));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let hardware = metauas::gpu::probe_adapter().is_some_and(|a| !a.software);
    let expected = if hardware {
        "metauas: backend gpu"
    } else {
        "metauas: backend cpu"
    };
    assert!(stderr.contains(expected), "expected `{expected}`: {stderr}");
    assert!(
        !stderr.contains("XDG_RUNTIME_DIR"),
        "loader noise: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// `--backend gpu` gives the CPU backend's map (to float32 rounding) and JSON.
#[test]
fn gpu_backend_segments_like_the_cpu() {
    if common::gpu_options(
        "gpu_backend_segments_like_the_cpu",
        metauas::graph::Precision::F32,
    )
    .is_none()
    {
        return;
    }
    let i = inputs();
    let mut maps = Vec::new();
    for backend in ["cpu", "gpu"] {
        let out_dir = common::temp_dir("cli-backend");
        let out = metauas(&[
            "segment",
            "--weights",
            s(&i.weights),
            "--prompt",
            s(&i.prompt),
            "--query",
            s(&i.query),
            "--size",
            "64",
            "--out",
            s(&out_dir),
            "--backend",
            backend,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{backend}: {stderr}");
        assert!(
            stderr.contains(&format!("metauas: backend {backend}")),
            "{stderr}"
        );
        let (shape, data) = read_npy_f32(&out_dir.join("frame.npy")).expect("npy");
        assert_eq!(shape, vec![64, 64]);
        maps.push(data);
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    let worst = maps[0]
        .iter()
        .zip(&maps[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "cpu and gpu maps differ by {worst}");
}

/// f16 without a GPU is refused with a line that says what it needs.
#[test]
fn f16_on_the_cpu_is_refused() {
    let i = inputs();
    let out = metauas(&[
        "segment",
        "--weights",
        s(&i.weights),
        "--prompt",
        s(&i.prompt),
        "--query",
        s(&i.query),
        "--backend",
        "cpu",
        "--precision",
        "f16",
    ]);
    assert_one_line_error(&out, "--precision f16: f16 storage needs the GPU backend");
}

/// `bench --json` carries the keys tools read, and `--batch N` adds the batched throughput.
#[test]
fn bench_json_keys_and_batch_throughput() {
    let out = metauas(&[
        "bench",
        "--size",
        "64",
        "--backend",
        "cpu",
        "--iters",
        "1",
        "--batch",
        "2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "full_ms",
        "cached_ms",
        "p90_full_ms",
        "p90_cached_ms",
        "peak_rss_mb",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    assert_eq!(
        (v["backend"].as_str(), v["size"].as_u64()),
        (Some("cpu"), Some(64))
    );
    assert_eq!(v["batch"], 2);
    let (ms, per_s) = (
        v["batch_ms"].as_f64().unwrap(),
        v["batch_images_per_s"].as_f64().unwrap(),
    );
    assert!((per_s - 2.0 / (ms * 1e-3)).abs() < 1e-6 * per_s, "{v}");
    let refused = metauas(&["bench", "--size", "64", "--batch", "0"]);
    assert_eq!(refused.status.code(), Some(2));
}

/// `bench --profile` on the CPU ends with a table by op family: every family of the query
/// graph once, each with a positive floor, and the families' times adding up to the
/// per-op table's (no node lost or counted twice).
#[test]
fn cpu_profile_sums_families_with_floors() {
    let out = metauas(&[
        "bench",
        "--size",
        "64",
        "--backend",
        "cpu",
        "--iters",
        "1",
        "--profile",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (ops, families) = text.split_once("\nby family:").expect("a family table");
    let per_op: f64 = ops
        .lines()
        .skip_while(|l| !l.starts_with("node "))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
        .sum();
    let names: Vec<String> = families
        .lines()
        .skip(2)
        .filter(|l| l.len() > 24 && !l.starts_with("all "))
        .map(|l| l[..24].trim().to_string())
        .collect();
    for want in ["1x1 convs", "depthwise", "3x3 convs, Winograd", "alignment"] {
        assert_eq!(
            names.iter().filter(|n| *n == want).count(),
            1,
            "{want}: {families}"
        );
    }
    let mut family_ms = 0.0;
    // Family names are padded to 24 columns (`floors.rs`); each per-op time is rounded to
    // 0.0005 ms at most.
    let rows = ops.lines().count() as f64;
    for line in families.lines().skip(2).filter(|l| l.len() > 24) {
        let cols: Vec<&str> = line[24..].split_whitespace().collect();
        let ms: f64 = cols[0].parse().unwrap();
        if line.starts_with("all ") {
            assert!((ms - family_ms).abs() < 0.01, "{families}");
            assert!(
                (ms - per_op).abs() < 0.002 + 0.0005 * rows,
                "{ms} vs {per_op}"
            );
        } else {
            family_ms += ms;
            let floor: f64 = cols[3].parse().unwrap();
            assert!(floor > 0.0, "{line}");
            assert!(cols[4] == "compute" || cols[4] == "memory", "{line}");
        }
    }
    assert!(family_ms > 0.0);
}

/// On the GPU, `bench --json` describes the work's shape (issue 21): every conv dispatch
/// under two waves of a 132-SM GPU has a short serial loop (split-K cut the long ones), and
/// the gpu-info report names the adapter.
#[test]
fn gpu_bench_reports_the_work_shape() {
    if common::gpu_options("gpu_bench_reports_the_work_shape", Precision::F32).is_none() {
        return;
    }
    let run = |split_k: &str| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_metauas"))
            .args([
                "bench",
                "--size",
                "64",
                "--backend",
                "gpu",
                "--iters",
                "1",
                "--json",
            ])
            .env("METAUAS_GPU_SPLIT_K", split_k)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (on, off) = (run("1"), run("0"));
    let shape = |v: &serde_json::Value, k: &str| v["shape"]["cached"][k].clone();
    assert_eq!(shape(&on, "submits"), 1);
    assert_eq!(on["shape"]["full"]["submits"], 1);
    assert_eq!(
        shape(&on, "under_264_with_long_serial_loops"),
        serde_json::json!([])
    );
    let long_off = shape(&off, "under_264_with_long_serial_loops");
    assert!(!long_off.as_array().unwrap().is_empty(), "{off}");
    assert!(shape(&on, "dispatches").as_u64() > shape(&off, "dispatches").as_u64());
    assert!(on["phases_cached_ms"]["submit_to_done"].as_f64().unwrap() > 0.0);
    let info = metauas(&["gpu-info", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["name"].as_str().is_some_and(|n| !n.is_empty()),
        "{info}"
    );
    assert!(
        info["limits"]["max_storage_buffer_binding_size"]
            .as_u64()
            .unwrap()
            > 0
    );
}
