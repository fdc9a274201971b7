//! `metauas eval`: the metrics against scikit-learn / scikit-image (fixture from
//! `tools/reference/make_metric_fixtures.py`), and the command end to end on a tiny
//! synthetic MVTec AD layout.

mod common;

use common::{assert_one_line_error, metauas, s};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use metauas::eval::metrics::{aupro, class_metrics, label_regions, ranking, METRIC_NAMES};
use metauas::io::output::read_npy_f32;
use metauas::synth::mvtec as synthetic;
use metauas::synth::synthetic_image;
use serde_json::Value;

// ---------------------------------------------------------------- metric fixtures

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics/metrics.json");
        let text = std::fs::read_to_string(&path).expect("read metrics fixture");
        serde_json::from_str(&text).expect("parse metrics fixture")
    })
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn u8s(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

/// `got` against the fixture's value (null = undefined = NaN here); returns the error.
fn check(case: &str, metric: &str, got: f64, want: &Value, tol: f64) -> f64 {
    match want.as_f64() {
        None => {
            assert!(want.is_null(), "{case} {metric}: bad fixture value {want}");
            assert!(
                got.is_nan(),
                "{case} {metric}: sklearn undefined, got {got}"
            );
            0.0
        }
        Some(w) => {
            let err = (got - w).abs();
            assert!(err <= tol, "{case} {metric}: got {got}, sklearn {w}");
            err
        }
    }
}

#[test]
fn ranking_metrics_match_scikit_learn() {
    let mut worst = [0.0f64; 3];
    for case in fixture()["ranking"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let r = ranking(&f32s(&case["scores"]), &u8s(&case["labels"]));
        for (i, (metric, got)) in [("auroc", r.auroc), ("ap", r.ap), ("f1max", r.f1max)]
            .into_iter()
            .enumerate()
        {
            worst[i] = worst[i].max(check(name, metric, got, &case[metric], 1e-6));
        }
    }
    eprintln!(
        "max abs error vs scikit-learn: AUROC {:.2e}, AP {:.2e}, F1max {:.2e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn aupro_and_regions_match_the_authors_procedure() {
    let mut worst = 0.0f64;
    for case in fixture()["pro"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let maps = f32s(&case["maps"]);
        let masks = u8s(&case["masks"]);
        for (i, (mask, want)) in masks
            .chunks(h * w)
            .zip(case["region_areas"].as_array().unwrap())
            .enumerate()
        {
            let (labels, count) = label_regions(mask, h, w);
            let mut areas = vec![0u64; count];
            for &l in labels.iter().filter(|&&l| l > 0) {
                areas[l as usize - 1] += 1;
            }
            areas.sort_unstable();
            let want: Vec<u64> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_u64().unwrap())
                .collect();
            assert_eq!(
                areas, want,
                "{name} image {i}: region areas vs scikit-image"
            );
        }
        let got = aupro(&maps, &masks, h, w);
        worst = worst.max(check(name, "aupro", got, &case["aupro"], 1e-4));
    }
    eprintln!("max abs error vs the authors' AUPRO (numpy/scikit-image): {worst:.2e}");
}

#[test]
fn class_metrics_match_the_reference_pipeline() {
    let mut worst = [0.0f64; 7];
    for case in fixture()["class"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let mut maps = f32s(&case["raw_maps"]);
        let mut masks = u8s(&case["masks"]);
        if !case["meta"].is_null() {
            masks = masks_through_meta_file(name, &case["meta"], &masks, h, w);
        }
        let m = class_metrics(&mut maps, &masks, &u8s(&case["labels"]), h, w);
        for (i, metric) in METRIC_NAMES.iter().enumerate() {
            let tol = if *metric == "P-AUPRO" { 1e-4 } else { 1e-6 };
            let err = check(name, metric, m.values[i], &case["metrics"][metric], tol);
            worst[i] = worst[i].max(err);
        }
        for metric in ["I-AUROC", "P-AUROC"] {
            let raw = case["raw_auroc"][metric].as_f64().unwrap();
            let flipped = m.flipped.iter().find(|(n, _)| *n == metric);
            assert_eq!(flipped.is_some(), raw < 0.5, "{name} {metric}: flip");
            if let Some((_, r)) = flipped {
                assert!((r - raw).abs() < 1e-6);
            }
        }
    }
    eprintln!("max abs error per metric (class pipeline): {worst:?}");
}

/// The ground truth of a fixture class listed in the authors' meta-file form: the lines are
/// read by `meta_files`; images whose `maskname` is `""` get `load_mask`'s mask (all 0 for
/// a normal image), the others the fixture's mask. Checks both against the fixture.
fn masks_through_meta_file(case: &str, meta: &Value, masks: &[u8], h: usize, w: usize) -> Vec<u8> {
    assert_eq!(h, w, "{case}: meta-file masks are square");
    let dir = common::temp_dir("eval-fixture-meta");
    let lines = meta.as_array().unwrap();
    write_lines(&dir.join("test.json"), lines);
    let first = lines[0]["filename"].as_str().unwrap();
    let class = first.split('/').next().unwrap();
    std::fs::write(
        dir.join("prompts.json"),
        serde_json::json!({ class: { "filename": first } }).to_string(),
    )
    .unwrap();
    let classes =
        metauas::eval::dataset::meta_files(&dir, &dir.join("test.json"), &dir.join("prompts.json"))
            .expect("meta files");
    assert_eq!(classes.len(), 1, "{case}: one class");
    let samples = &classes[0].samples;
    assert_eq!(samples.len(), lines.len());
    let mut out = Vec::with_capacity(masks.len());
    for ((sample, line), want) in samples.iter().zip(lines).zip(masks.chunks(h * w)) {
        assert_eq!(sample.label as u64, line["label"].as_u64().unwrap());
        if line["maskname"] == "" {
            assert!(
                sample.mask.is_none(),
                "{case} {}: `maskname: \"\"`",
                sample.name
            );
            let got = metauas::eval::dataset::load_mask(sample, h).expect("mask");
            assert_eq!(got, want, "{case} {}: mask of a normal image", sample.name);
            out.extend_from_slice(&got);
        } else {
            assert!(sample.mask.is_some(), "{case} {}: mask path", sample.name);
            out.extend_from_slice(want);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

// ---------------------------------------------------------------- end to end

const SIZE: usize = 64;

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "metauas failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny MVTec AD layout (`metauas::synth::mvtec`, the README's example): 3 classes (two
/// of PNG images, one of JPEG images as VisA ships), 3 train/good, 2 test/good and 3
/// test/defect images (two defect types) with masks, plus synthetic weights.
struct Dataset {
    root: PathBuf,
    weights: PathBuf,
}

fn dataset() -> &'static Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = common::temp_dir("eval");
        let weights = dir.join("weights.safetensors");
        common::write_synthetic_weights(&weights, &common::default_recipe(11));
        let root = dir.join("mvtec");
        let classes = [
            ("bottle", synthetic::ImageFormat::Png),
            ("screw", synthetic::ImageFormat::Png),
            ("pcb", synthetic::ImageFormat::Jpeg),
        ];
        synthetic::write_mvtec_layout_as(&root, &classes, 72, 64).expect("dataset");
        Dataset { root, weights }
    })
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read json")).expect("json")
}

/// The report's structure: both classes, the seven metric names, values in [0, 1] or null,
/// the mean equal to the mean of the classes.
fn check_report_structure(report: &Value, classes: &[&str]) {
    let got: Vec<&str> = report["classes"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(got, classes);
    for name in classes {
        let m = report["classes"][name].as_object().unwrap();
        let keys: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
        assert_eq!(keys, METRIC_NAMES);
    }
    for metric in METRIC_NAMES {
        let vals: Vec<f64> = classes
            .iter()
            .filter_map(|c| report["classes"][c][metric].as_f64())
            .collect();
        for v in &vals {
            assert!((0.0..=1.0).contains(v), "{metric} = {v}");
        }
        match report["mean"][metric].as_f64() {
            Some(mean) => {
                let want = vals.iter().sum::<f64>() / vals.len() as f64;
                assert!((mean - want).abs() < 1e-12, "{metric} mean");
            }
            None => assert!(vals.is_empty(), "{metric}: mean null but classes defined"),
        }
    }
    assert!(report["weights_hash"]
        .as_str()
        .unwrap()
        .starts_with("mw64:"));
    assert_eq!(report["size"], SIZE);
    assert!(report["backend"].as_str().unwrap().starts_with("cpu"));
    assert!(report["command"].as_str().unwrap().contains(" eval "));
}

#[test]
fn eval_mvtec_layout_end_to_end() {
    let d = dataset();
    let out = common::temp_dir("eval-out");
    let size = SIZE.to_string();
    let run = metauas(&[
        "eval",
        "--weights",
        s(&d.weights),
        "--root",
        s(&d.root),
        "--layout",
        "mvtec",
        "--prompt-seed",
        "3",
        "--size",
        &size,
        "--backend",
        "cpu",
        "--out",
        s(&out),
        "--save-maps",
    ]);
    assert_success(&run);
    let stdout = String::from_utf8(run.stdout).unwrap();
    eprintln!("{stdout}");
    assert!(stdout.contains("| bottle | 5 | 3 |"), "{stdout}");
    let report = read_json(&out.join("report.json"));
    check_report_structure(&report, &["bottle", "pcb", "screw"]);
    assert_eq!(report["images"]["screw"]["total"], 5);
    assert_eq!(report["images"]["pcb"]["total"], 5);
    assert_eq!(report["images"]["screw"]["defective"], 3);
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5); // header, three classes, mean
    assert!(csv
        .starts_with("class,images,defective,I-AUROC,I-AP,I-F1max,P-AUROC,P-AP,P-F1max,P-AUPRO,"));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| **mean** |"));

    // Recompute every metric from the saved maps with the library functions.
    for class in ["bottle", "pcb", "screw"] {
        let dir = out.join("maps").join(class);
        let index = std::fs::read_to_string(dir.join("index.jsonl")).unwrap();
        let (mut maps, mut masks, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        let mut defective_with_mask = 0;
        for line in index.lines() {
            let entry: Value = serde_json::from_str(line).unwrap();
            let (shape, map) = read_npy_f32(&dir.join(entry["map"].as_str().unwrap())).unwrap();
            assert_eq!(shape, vec![SIZE, SIZE]);
            let (_, gt) = read_npy_f32(&dir.join(entry["gt"].as_str().unwrap())).unwrap();
            let label = entry["label"].as_u64().unwrap() as u8;
            let set = gt.iter().filter(|&&v| v == 1.0).count();
            if label == 0 {
                assert_eq!(set, 0, "good images have an empty ground truth");
            } else {
                assert!(set > 0 && set < SIZE * SIZE);
                defective_with_mask += 1;
            }
            maps.extend(map);
            masks.extend(gt.iter().map(|&v| v as u8));
            labels.push(label);
        }
        assert_eq!(defective_with_mask, 3);
        let m = class_metrics(&mut maps, &masks, &labels, SIZE, SIZE);
        for (i, metric) in METRIC_NAMES.iter().enumerate() {
            let want = m.values[i];
            match report["classes"][class][metric].as_f64() {
                Some(got) => assert_eq!(got, want, "{class} {metric}"),
                None => assert!(want.is_nan(), "{class} {metric}"),
            }
        }
        // The I-AUROC is defined here: 2 good and 3 defective images.
        assert!(m.values[0].is_finite());
    }
    check_jpeg_class_maps(d, &out.join("maps").join("pcb"));
    check_html_report(
        &out.join("report.html"),
        &report,
        &["bottle", "pcb", "screw"],
    );
}

/// The points of the polyline `kind` drawn for `class` in report.html.
fn drawn_points(html: &str, class: &str, kind: &str) -> Vec<(f64, f64)> {
    let key = format!("data-class=\"{class}\" data-kind=\"{kind}\" points=\"");
    let start = html
        .find(&key)
        .unwrap_or_else(|| panic!("no {kind} curve for {class}"))
        + key.len();
    let end = start + html[start..].find('"').unwrap();
    html[start..end]
        .split(' ')
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

fn trapezoids(points: &[(f64, f64)]) -> f64 {
    points
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum()
}

/// report.html: self-contained (no script, nothing fetched), and the drawn ROC curves are the
/// ones the metrics integrate: the area under the image ROC polyline is the reported I-AUROC
/// (before the authors' flip), the pixel one within the thinning's tolerance.
fn check_html_report(path: &Path, report: &Value, classes: &[&str]) {
    let html = std::fs::read_to_string(path).unwrap();
    assert!(!html.contains("<script") && !html.contains("http://") && !html.contains("https://"));
    for class in classes {
        let raw = |metric: &str| {
            let flipped = report["flipped_auroc"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["class"] == *class && f["metric"] == metric);
            match flipped {
                Some(f) => f["raw"].as_f64().unwrap(),
                None => report["classes"][class][metric].as_f64().unwrap(),
            }
        };
        let image = trapezoids(&drawn_points(&html, class, "image-roc"));
        assert!(
            (image - raw("I-AUROC")).abs() < 1e-12,
            "{class}: {image} vs {}",
            raw("I-AUROC")
        );
        let pixel = trapezoids(&drawn_points(&html, class, "pixel-roc"));
        assert!(
            (pixel - raw("P-AUROC")).abs() < 2e-3,
            "{class}: {pixel} vs {}",
            raw("P-AUROC")
        );
        assert!(html.contains(&format!("data-class=\"{class}\" data-kind=\"pro\"")));
        assert!(html.matches("data:image/png;base64,").count() >= classes.len());
    }
}

/// The JPEG class's maps, as `eval` saved them, are the library's maps of the decoded JPEG
/// files (decoded as Pillow decodes them: tests/image_corpus.rs), bit for bit.
fn check_jpeg_class_maps(d: &Dataset, maps_dir: &Path) {
    let engine = metauas::Engine::from_file(&d.weights, SIZE).unwrap();
    let index = std::fs::read_to_string(maps_dir.join("index.jsonl")).unwrap();
    for line in index.lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        let resolve = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                d.root.join(p)
            }
        };
        let query = resolve(entry["filename"].as_str().unwrap());
        let prompt = resolve(entry["prompt"].as_str().unwrap());
        for path in [&query, &prompt] {
            assert_eq!(path.extension().unwrap(), "jpg", "{}", path.display());
        }
        let decode = |p: &Path| metauas::io::image::decode_image_file(p).unwrap();
        let features = engine.encode_prompt(&decode(&prompt)).unwrap();
        let map = engine.segment(&features, &decode(&query)).unwrap();
        let (_, saved) = read_npy_f32(&maps_dir.join(entry["map"].as_str().unwrap())).unwrap();
        assert_eq!(saved, map.data, "{}", query.display());
    }
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// The authors' meta-file form of the same dataset (class `bottle` only).
fn test_lines() -> Vec<Value> {
    let mut lines = Vec::new();
    for i in 0..2 {
        lines.push(serde_json::json!({"filename": format!("bottle/test/good/{i:03}.png"), "label": 0, "clsname": "bottle"}));
    }
    for (defect, i) in [("crack", 0), ("crack", 1), ("scratch", 0)] {
        lines.push(serde_json::json!({
            "filename": format!("bottle/test/{defect}/{i:03}.png"),
            "label": 1,
            "maskname": format!("bottle/ground_truth/{defect}/{i:03}_mask.png"),
            "clsname": "bottle",
        }));
    }
    lines
}

fn run_meta(test_json: &Path, prompt_json: &Path, out: &Path) -> Output {
    let d = dataset();
    let size = SIZE.to_string();
    metauas(&[
        "eval",
        "--weights",
        s(&d.weights),
        "--root",
        s(&d.root),
        "--test-json",
        s(test_json),
        "--prompt-json",
        s(prompt_json),
        "--size",
        &size,
        "--backend",
        "cpu",
        "--out",
        s(out),
    ])
}

#[test]
fn eval_meta_files_in_both_prompt_forms_agree() {
    let dir = common::temp_dir("eval-meta");
    let test_json = dir.join("test.json");
    write_lines(&test_json, &test_lines());
    // Form 1: one prompt per class.
    let per_class = dir.join("prompts_class.json");
    std::fs::write(
        &per_class,
        r#"{"bottle": {"filename": "bottle/train/good/001.png"}}"#,
    )
    .unwrap();
    // Form 2: per query, a ranked list (the first is used), one object per line.
    let per_query = dir.join("prompts_query.json");
    let lines: Vec<Value> = test_lines()
        .iter()
        .map(|l| {
            let mut m = serde_json::Map::new();
            m.insert(
                l["filename"].as_str().unwrap().to_string(),
                serde_json::json!(["bottle/train/good/001.png", "bottle/train/good/000.png"]),
            );
            Value::Object(m)
        })
        .collect();
    write_lines(&per_query, &lines);

    let (out1, out2) = (dir.join("out1"), dir.join("out2"));
    assert_success(&run_meta(&test_json, &per_class, &out1));
    assert_success(&run_meta(&test_json, &per_query, &out2));
    let (r1, r2) = (
        read_json(&out1.join("report.json")),
        read_json(&out2.join("report.json")),
    );
    check_report_structure(&r1, &["bottle"]);
    assert_eq!(r1["classes"], r2["classes"]);
    assert_eq!(r1["mean"], r1["classes"]["bottle"]);
}

#[test]
fn eval_errors_are_one_line() {
    let d = dataset();
    let dir = common::temp_dir("eval-errors");
    let size = SIZE.to_string();
    let base = |root: &Path, extra: &[&str]| -> Output {
        let mut args = vec![
            "eval",
            "--weights",
            s(&d.weights),
            "--root",
            s(root),
            "--size",
            &size,
            "--backend",
            "cpu",
            "--out",
            s(&dir),
        ];
        args.extend_from_slice(extra);
        metauas(&args)
    };
    let missing = dir.join("nowhere");
    assert_one_line_error(&base(&missing, &["--layout", "mvtec"]), "no such directory");
    assert_one_line_error(
        &base(&d.root, &["--layout", "mvtec", "--class", "cable"]),
        "unknown class `cable`",
    );
    // Not an MVTec layout.
    assert_one_line_error(
        &base(&dir, &["--layout", "mvtec"]),
        "not an MVTec AD layout",
    );

    // Meta files: a bad JSON line names its line number; a missing image; a class without
    // a prompt.
    let prompts = dir.join("p.json");
    std::fs::write(&prompts, r#"{"bottle": "bottle/train/good/000.png"}"#).unwrap();
    let bad = dir.join("bad.json");
    let mut text: String = test_lines().iter().map(|l| format!("{l}\n")).collect();
    text.push_str("{\"filename\": oops}\n");
    std::fs::write(&bad, text).unwrap();
    let meta = |t: &Path| {
        base(
            &d.root,
            &["--test-json", s(t), "--prompt-json", s(&prompts)],
        )
    };
    assert_one_line_error(&meta(&bad), "line 6: bad JSON");
    let gone = dir.join("gone.json");
    write_lines(
        &gone,
        &[serde_json::json!({"filename": "bottle/test/good/999.png", "label": 0})],
    );
    assert_one_line_error(&meta(&gone), "999.png: no such file");
    let other = dir.join("other.json");
    write_lines(
        &other,
        &[serde_json::json!({"filename": "screw/test/good/000.png", "label": 0})],
    );
    assert_one_line_error(&meta(&other), "no prompt for `screw/test/good/000.png`");
    let label = dir.join("label.json");
    write_lines(
        &label,
        &[serde_json::json!({"filename": "bottle/test/good/000.png", "label": 2})],
    );
    assert_one_line_error(&meta(&label), "line 1: `label` is 2");

    // An undecodable test image fails with one line, no panic.
    let broken_root = dir.join("broken");
    let c = broken_root.join("bottle");
    for sub in ["train/good", "test/good"] {
        std::fs::create_dir_all(c.join(sub)).unwrap();
    }
    common::write_png(
        &c.join("train/good/000.png"),
        &synthetic_image(1, 40, 40, None),
    );
    std::fs::write(c.join("test/good/000.png"), b"not a png").unwrap();
    assert_one_line_error(
        &base(&broken_root, &["--layout", "mvtec"]),
        "not a decodable image",
    );
    // A defective image without its mask.
    std::fs::create_dir_all(c.join("test/crack")).unwrap();
    common::write_png(
        &c.join("test/crack/000.png"),
        &synthetic_image(2, 40, 40, None),
    );
    assert_one_line_error(
        &base(&broken_root, &["--layout", "mvtec"]),
        "missing ground-truth mask",
    );
}
