//! The decision layer against independent code (fixture from
//! `tools/reference/make_decision_fixtures.py`): frame-size maps against OpenCV's
//! `cv2.resize(INTER_LINEAR)`, regions against `scipy.ndimage.label` (8-connectivity),
//! calibration statistics against numpy, F1-optimal thresholds against scikit-learn's
//! `precision_recall_curve`. Then the CLI end to end: a bank built with an inspection mask,
//! calibrated, saved, reloaded, refused by other weights, used by `segment`; and every bad
//! input a one-line error.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{assert_one_line_error, metauas, s};
use metauas::eval::metrics::f1_optimal;
use metauas::io::image::{decode_image_file, RgbImage8};
use metauas::io::output::read_npy_f32;
use metauas::model::decision::{
    find_regions, label_regions, resize_map, CalibratedThreshold, Rule, Stats,
};
use metauas::model::{Engine, PromptBank};
use metauas::synth::synthetic_image;
use serde_json::Value;

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decision/decision.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn num(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

#[test]
fn frame_size_maps_match_opencv_inter_linear() {
    let mut worst = 0f64;
    for case in fixture()["resize"].as_array().unwrap() {
        let (side, w, h) = (
            num(&case["side"]),
            num(&case["width"]),
            num(&case["height"]),
        );
        let got = resize_map(&f32s(&case["map"]), side, w, h);
        let want = f32s(&case["want"]);
        assert_eq!(got.len(), want.len());
        let mut case_worst = 0f64;
        for (g, x) in got.iter().zip(&want) {
            case_worst = case_worst.max((f64::from(*g) - f64::from(*x)).abs());
        }
        eprintln!("{side} -> {w}x{h}: {case_worst:e}");
        worst = worst.max(case_worst);
    }
    // OpenCV interpolates in float32 too, but in its own order (IPP or SIMD paths): up to
    // 1.04e-6 apart on these cases, a few float32 ulps of the map values.
    assert!(
        worst <= 2e-6,
        "largest difference from cv2.resize: {worst:e}"
    );
}

#[test]
fn regions_match_scipy_ndimage() {
    for (k, case) in fixture()["regions"].as_array().unwrap().iter().enumerate() {
        let side = num(&case["side"]);
        let map = f32s(&case["map"]);
        let t = case["threshold"].as_f64().unwrap();
        let frame = usizes(&case["frame"]);
        let roi: Option<Vec<u8>> = case["roi"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap() as u8).collect());
        // Labels, numbered in raster order as scipy numbers them.
        let mask: Vec<u8> = (0..map.len())
            .map(|i| u8::from(roi.as_ref().is_none_or(|r| r[i] != 0) && f64::from(map[i]) >= t))
            .collect();
        let (labels, count) = label_regions(&mask, side, side);
        let want_labels: Vec<u32> = usizes(&case["labels"]).iter().map(|&v| v as u32).collect();
        assert_eq!(labels, want_labels, "case {k}: labels");
        let want = case["regions"].as_array().unwrap();
        assert_eq!(count, want.len(), "case {k}");
        let got = find_regions(&map, side, t, roi.as_deref(), (frame[0], frame[1]), 1);
        assert_eq!(got.len(), want.len());
        // Sorted by max, highest first.
        assert!(
            got.windows(2).all(|w| w[0].max >= w[1].max),
            "case {k}: order"
        );
        let inspected = num(&case["inspected"]) as f64;
        for r in want {
            let map_box: Vec<usize> = usizes(&r["map_box"]);
            let area = num(&r["area"]);
            let ours = got
                .iter()
                .find(|g| g.map_bbox.to_vec() == map_box && g.area_px == area)
                .unwrap_or_else(|| panic!("case {k}: no region like {r}"));
            assert_eq!(ours.bbox.to_vec(), usizes(&r["box"]), "case {k}: frame box");
            assert_eq!(f64::from(ours.max), r["max"].as_f64().unwrap());
            assert!((ours.mean - r["mean"].as_f64().unwrap()).abs() < 1e-12);
            let wc = r["map_centroid"].as_array().unwrap();
            for (got, want) in ours.map_centroid.iter().zip(wc) {
                assert!((got - want.as_f64().unwrap()).abs() < 1e-9, "{r}");
            }
            assert!((ours.area_fraction - area as f64 / inspected).abs() < 1e-15);
        }
    }
}

#[test]
fn calibration_statistics_match_numpy() {
    for case in fixture()["stats"].as_array().unwrap() {
        let values = f32s(&case["values"]);
        let want = &case["stats"];
        let stats = Stats::of(&mut values.clone());
        assert_eq!(stats.count, num(&want["count"]));
        assert_eq!(stats.min, want["min"].as_f64().unwrap());
        assert_eq!(stats.max, want["max"].as_f64().unwrap());
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-3);
        assert!(close(stats.mean, want["mean"].as_f64().unwrap()), "mean");
        assert!(close(stats.std, want["std"].as_f64().unwrap()), "std");
        for (q, v) in &stats.quantiles {
            let w = want["quantiles"][q.to_string()].as_f64().unwrap();
            assert_eq!(*v, w, "quantile {q} of {} values", values.len());
        }
        for (rule, w) in case["rules"].as_object().unwrap() {
            let rule: Rule = rule.parse().unwrap();
            let t = CalibratedThreshold::from_values(&mut values.clone(), rule, 0.0);
            let w = w.as_f64().unwrap();
            match rule {
                Rule::Sigma(_) => assert!(close(t.value, w), "{rule}: {} vs {w}", t.value),
                _ => assert_eq!(t.value, w, "{rule}"),
            }
            let with_margin = CalibratedThreshold::from_values(&mut values.clone(), rule, 0.1);
            assert!((with_margin.value - t.value * 1.1).abs() < 1e-15);
        }
    }
}

#[test]
fn f1_optimal_thresholds_match_scikit_learn() {
    for case in fixture()["f1"].as_array().unwrap() {
        let scores = f32s(&case["scores"]);
        let labels: Vec<u8> = usizes(&case["labels"]).iter().map(|&v| v as u8).collect();
        let (t, f1) = f1_optimal(&scores, &labels).unwrap();
        assert_eq!(t, case["threshold"].as_f64().unwrap());
        assert!((f1 - case["f1"].as_f64().unwrap()).abs() < 1e-12);
    }
    assert_eq!(f1_optimal(&[0.1, 0.2], &[0, 0]), None);
    assert_eq!(f1_optimal(&[f32::NAN, 0.2], &[1, 0]), None);
}

// ---------------------------------------------------------------- end to end

const SIZE: &str = "64";

struct Inputs {
    dir: PathBuf,
    weights: PathBuf,
    other_weights: PathBuf,
    prompts: PathBuf,
    normals: PathBuf,
    roi: PathBuf,
    query: PathBuf,
}

fn write_image(path: &Path, img: &RgbImage8) {
    common::write_png(path, img);
}

fn inputs() -> &'static Inputs {
    static INPUTS: OnceLock<Inputs> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = common::temp_dir("decision");
        let weights = dir.join("w.safetensors");
        common::write_synthetic_weights(&weights, &common::default_recipe(3));
        let other_weights = dir.join("other.safetensors");
        common::write_synthetic_weights(&other_weights, &common::default_recipe(4));
        let prompts = dir.join("prompts");
        let normals = dir.join("normals");
        std::fs::create_dir_all(&prompts).unwrap();
        std::fs::create_dir_all(&normals).unwrap();
        for seed in [1, 2] {
            write_image(
                &prompts.join(format!("p{seed}.png")),
                &synthetic_image(seed, 96, 80, None),
            );
        }
        for seed in 10..22 {
            write_image(
                &normals.join(format!("n{seed}.png")),
                &synthetic_image(seed, 96, 80, None),
            );
        }
        // ROI: the left two thirds of the frame.
        let mut roi = RgbImage8 {
            width: 96,
            height: 80,
            data: vec![0; 96 * 80 * 3],
        };
        for y in 0..80 {
            for x in 0..64 {
                roi.data[(y * 96 + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
            }
        }
        let roi_path = dir.join("roi.png");
        write_image(&roi_path, &roi);
        let query = dir.join("query.png");
        write_image(&query, &synthetic_image(30, 96, 80, Some((30, 30, 14))));
        Inputs {
            dir,
            weights,
            other_weights,
            prompts,
            normals,
            roi: roi_path,
            query,
        }
    })
}

fn run_ok(args: &[&str]) -> String {
    let out = metauas(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn build_bank(i: &Inputs, name: &str, roi: bool) -> PathBuf {
    let bank = i.dir.join(name);
    let mut args = vec![
        "bank",
        "build",
        "--weights",
        s(&i.weights),
        "--images",
        s(&i.prompts),
    ];
    args.extend(["--out", s(&bank), "--size", SIZE, "--backend", "cpu"]);
    if roi {
        args.extend(["--roi", s(&i.roi)]);
    }
    run_ok(&args);
    bank
}

#[test]
fn calibrated_bank_round_trip_and_verdicts() {
    let i = inputs();
    let bank_path = build_bank(i, "bank.safetensors", true);
    let out = metauas(&[
        "bank",
        "calibrate",
        "--bank",
        s(&bank_path),
        "--weights",
        s(&i.weights),
        "--images",
        s(&i.normals),
        "--size",
        SIZE,
        "--backend",
        "cpu",
        "--margin",
        "0.1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The thresholds follow from the maps the library gives for the same images.
    let engine = Engine::from_file(&i.weights, 64).unwrap();
    let bank = PromptBank::load(&bank_path, &engine).unwrap();
    let roi = bank.roi().expect("the bank keeps its mask").clone();
    assert_eq!(roi.frame, (96, 80));
    let prompts = metauas::model::PromptSet::from_bank(&bank, Default::default()).unwrap();
    let mut top = f32::NEG_INFINITY;
    let mut pixels = Vec::new();
    for entry in std::fs::read_dir(&i.normals).unwrap() {
        let img = decode_image_file(&entry.unwrap().path()).unwrap();
        let (mut map, _) = prompts.segment(&engine, &img).unwrap();
        roi.apply(&mut map).unwrap();
        for (v, &inside) in map.data.iter().zip(&roi.inside) {
            if inside != 0 {
                top = top.max(*v);
                pixels.push(f64::from(*v));
            }
        }
    }
    let cal = bank.calibration().expect("calibrated").clone();
    assert_eq!(cal.images.len(), 12);
    assert!((cal.image.value - f64::from(top) * 1.1).abs() < 1e-12);
    assert_eq!(cal.pixel.stats.count, pixels.len());
    assert_eq!(line["image"]["value"].as_f64().unwrap(), cal.image.value);
    // Reloading by other weights is refused, naming the bank.
    let other = Engine::from_file(&i.other_weights, 64).unwrap();
    let e = PromptBank::load(&bank_path, &other)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(s(&bank_path)) && e.contains("other weights"),
        "{e}"
    );

    // Segment with the bank: verdicts and regions from the calibration, outputs at the
    // frame's size, zero outside the mask.
    let out_dir = i.dir.join("seg");
    let stdout = run_ok(&[
        "segment",
        "--weights",
        s(&i.weights),
        "--bank",
        s(&bank_path),
        "--query",
        s(&i.query),
        "--size",
        SIZE,
        "--backend",
        "cpu",
        "--out",
        s(&out_dir),
        "--draw-regions",
        "--npy-size",
        "original",
    ]);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["verdict"]["image_threshold"]["source"], "calibration");
    assert_eq!(
        v["verdict"]["image_threshold"]["value"].as_f64().unwrap(),
        cal.image.value
    );
    let score = v["score"].as_f64().unwrap();
    assert_eq!(
        v["verdict"]["anomalous"].as_bool().unwrap(),
        score >= cal.image.value
    );
    assert_eq!(v["frame"], serde_json::json!([96, 80]));
    let (shape, big) = read_npy_f32(&out_dir.join("query.npy")).unwrap();
    assert_eq!(shape, vec![80, 96]);
    // The right third is outside the mask: 0 there (past the blend of the edge).
    for y in 0..80 {
        for x in 72..96 {
            assert_eq!(big[y * 96 + x], 0.0);
        }
    }
    for suffix in ["heatmap", "overlay", "mask"] {
        let img = decode_image_file(&out_dir.join(format!("query_{suffix}.png"))).unwrap();
        assert_eq!((img.width, img.height), (96, 80), "{suffix}");
    }
    for r in v["regions"].as_array().unwrap() {
        let b = usizes(&r["box"]);
        assert!(b[0] < b[2] && b[2] <= 96 && b[3] <= 80 && b[0] < 72, "{r}");
        assert!(r["max"].as_f64().unwrap() >= cal.pixel.value);
    }
    // A given threshold overrides the calibration and says so.
    let stdout = run_ok(&[
        "segment",
        "--weights",
        s(&i.weights),
        "--bank",
        s(&bank_path),
        "--query",
        s(&i.query),
        "--size",
        SIZE,
        "--backend",
        "cpu",
        "--out",
        s(&out_dir),
        "--threshold",
        "0.25",
        "--output-size",
        "model",
        "--heatmap-scale",
        "calibrated",
    ]);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["verdict"]["pixel_threshold"]["source"], "given");
    assert_eq!(
        v["verdict"]["pixel_threshold"]["value"].as_f64().unwrap(),
        0.25
    );
    let mask = decode_image_file(&out_dir.join("query_mask.png")).unwrap();
    assert_eq!((mask.width, mask.height), (64, 64));
}

#[test]
fn bad_decision_inputs_are_one_line_errors() {
    let i = inputs();
    let bank = build_bank(i, "plain.safetensors", false);
    let calibrate = |extra: &[&str]| {
        let mut args = vec![
            "bank",
            "calibrate",
            "--bank",
            s(&bank),
            "--weights",
            s(&i.weights),
        ];
        args.extend(["--size", SIZE, "--backend", "cpu"]);
        args.extend(extra);
        metauas(&args)
    };
    let normals = s(&i.normals);
    assert_one_line_error(
        &calibrate(&["--images", normals, "--method", "quantile:2"]),
        "--method",
    );
    assert_one_line_error(
        &calibrate(&["--images", normals, "--method", "median"]),
        "unknown rule",
    );
    assert_one_line_error(
        &calibrate(&["--images", normals, "--pixel-method", "sigma:x"]),
        "--pixel-method",
    );
    assert_one_line_error(
        &calibrate(&["--images", normals, "--margin", "-2"]),
        "--margin",
    );
    let empty = i.dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(&calibrate(&["--images", s(&empty)]), "no image");
    // Other weights: the bank is refused before any work.
    let out = metauas(&[
        "bank",
        "calibrate",
        "--bank",
        s(&bank),
        "--weights",
        s(&i.other_weights),
        "--images",
        normals,
        "--size",
        SIZE,
    ]);
    assert_one_line_error(&out, "other weights");
    // A mask of another shape than the images.
    let small = i.dir.join("small_roi.png");
    write_image(
        &small,
        &RgbImage8 {
            width: 50,
            height: 50,
            data: vec![255; 50 * 50 * 3],
        },
    );
    let out = metauas(&[
        "bank",
        "build",
        "--weights",
        s(&i.weights),
        "--images",
        s(&i.prompts),
        "--out",
        s(&i.dir.join("never.safetensors")),
        "--size",
        SIZE,
        "--roi",
        s(&small),
    ]);
    assert_one_line_error(&out, "inspection mask is 50x50");
    assert!(!i.dir.join("never.safetensors").exists());
    let black = i.dir.join("black_roi.png");
    write_image(
        &black,
        &RgbImage8 {
            width: 96,
            height: 80,
            data: vec![0; 96 * 80 * 3],
        },
    );
    let out = metauas(&[
        "bank",
        "build",
        "--weights",
        s(&i.weights),
        "--images",
        s(&i.prompts),
        "--out",
        s(&i.dir.join("never.safetensors")),
        "--size",
        SIZE,
        "--roi",
        s(&black),
    ]);
    assert_one_line_error(&out, "all black");
    // Segment: a calibrated heatmap scale without any threshold; a query of another size
    // than the mask fails that query, naming it.
    let bad_out = i.dir.join("bad-out");
    let seg = |extra: &[&str]| {
        let mut args = vec!["segment", "--weights", s(&i.weights), "--bank", s(&bank)];
        args.extend(["--query", s(&i.query), "--size", SIZE, "--backend", "cpu"]);
        args.extend(["--out", s(&bad_out)]);
        args.extend(extra);
        metauas(&args)
    };
    assert_one_line_error(
        &seg(&["--heatmap-scale", "calibrated"]),
        "no pixel threshold",
    );
    assert_one_line_error(&seg(&["--draw-regions"]), "no pixel threshold");
    assert_one_line_error(&seg(&["--roi", s(&small)]), "inspection mask is 50x50");
    assert_one_line_error(&seg(&["--threshold", "nan"]), "--threshold");
}

#[test]
fn few_calibration_images_get_a_warning() {
    let i = inputs();
    let bank = build_bank(i, "few.safetensors", false);
    let one = i.normals.join("n10.png");
    let out = metauas(&[
        "bank",
        "calibrate",
        "--bank",
        s(&bank),
        "--weights",
        s(&i.weights),
        "--images",
        s(&one),
        "--size",
        SIZE,
        "--backend",
        "cpu",
        "--method",
        "sigma:3",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: only 1 calibration image"),
        "{stderr}"
    );
}

#[test]
fn labeled_set_reports_f1_optimal_thresholds_without_using_them() {
    let i = inputs();
    let bank = build_bank(i, "labeled.safetensors", false);
    let root = i.dir.join("labeled");
    std::fs::create_dir_all(root.join("bottle")).unwrap();
    let mut lines = String::new();
    let mut truth = Vec::new();
    for k in 0..6 {
        let defect = (k % 2 == 1).then_some((20 + 5 * k, 25, 12));
        let name = format!("bottle/{k}.png");
        write_image(
            &root.join(&name),
            &synthetic_image(40 + k as u64, 96, 80, defect),
        );
        let mut line = serde_json::json!({"filename": name, "label": u8::from(defect.is_some())});
        if let Some((x, y, r)) = defect {
            let mut mask = RgbImage8 {
                width: 96,
                height: 80,
                data: vec![0; 96 * 80 * 3],
            };
            for yy in y - r / 2..y + r / 2 {
                for xx in x - r / 2..x + r / 2 {
                    mask.data[(yy * 96 + xx) * 3..][..3].copy_from_slice(&[255; 3]);
                }
            }
            let mask_name = format!("bottle/{k}_mask.png");
            write_image(&root.join(&mask_name), &mask);
            line["maskname"] = mask_name.into();
        }
        truth.push(defect.is_some());
        lines.push_str(&format!("{line}\n"));
    }
    let labels = root.join("test.jsonl");
    std::fs::write(&labels, lines).unwrap();
    let out = metauas(&[
        "bank",
        "calibrate",
        "--bank",
        s(&bank),
        "--weights",
        s(&i.weights),
        "--images",
        s(&i.normals),
        "--size",
        SIZE,
        "--backend",
        "cpu",
        "--labels",
        s(&labels),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("F1-optimal image threshold"), "{stderr}");
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    let f1 = &line["f1_optimal"];
    assert_eq!(
        (
            f1["normal_images"].as_u64(),
            f1["defective_images"].as_u64()
        ),
        (Some(3), Some(3))
    );
    // The image threshold is the argmax over the library's scores of the labeled images.
    let engine = Engine::from_file(&i.weights, 64).unwrap();
    let loaded = PromptBank::load(&bank, &engine).unwrap();
    let prompts = metauas::model::PromptSet::from_bank(&loaded, Default::default()).unwrap();
    let scores: Vec<f32> = (0..6)
        .map(|k| {
            let img = decode_image_file(&root.join(format!("bottle/{k}.png"))).unwrap();
            prompts.segment(&engine, &img).unwrap().0.score()
        })
        .collect();
    let labels_u8: Vec<u8> = truth.iter().map(|&t| u8::from(t)).collect();
    let (t, _) = f1_optimal(&scores, &labels_u8).unwrap();
    assert_eq!(f1["image"]["threshold"].as_f64().unwrap(), t);
    // Reported, not used: the calibrated threshold stays the normal images' rule.
    let cal = loaded.calibration().unwrap();
    assert_ne!(cal.image.value, t);
    assert_eq!(cal.f1.as_ref().unwrap().image.unwrap().0, t);
    // Several classes without --class: one line listing them.
    std::fs::write(
        &labels,
        "{\"filename\":\"bottle/0.png\",\"label\":0}\n{\"filename\":\"cable/0.png\",\"label\":0,\"clsname\":\"cable\"}\n",
    )
    .unwrap();
    let out = metauas(&[
        "bank",
        "calibrate",
        "--bank",
        s(&bank),
        "--weights",
        s(&i.weights),
        "--images",
        s(&i.normals),
        "--size",
        SIZE,
        "--labels",
        s(&labels),
    ]);
    assert_one_line_error(&out, "choose one with --class");
}
