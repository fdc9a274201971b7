//! Reference bundles (issue 23): `segment --taps` against the PyTorch fixtures, `compare` on
//! a perturbed bundle, and malformed bundles (one line each, never a panic).

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::fixture::{bundle_name, image_from_meta, Fixture, FIXTURE_TAPS};
use common::{assert_one_line_error, metauas, s};
use metauas::bundle::{compare, Bundle, CompareOptions, Metric, Outcome};
use metauas::io::output::{read_npy_f32, write_npy_f32};
use metauas::model::taps::tap_names;
use serde_json::Value;

const FACTOR: f64 = 3.0;
const SLACK: f64 = 1e-5;

/// One `segment --taps` run on the s256_smooth fixture's weights and images, shared by the
/// tests (bundle folder, segment's own map file, the fixture).
struct Run {
    bundle: PathBuf,
    map: PathBuf,
    weights: PathBuf,
    fixture: Fixture,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let fixture = Fixture::load("s256_smooth.safetensors");
        let dir = common::temp_dir("taps");
        let weights = dir.join("weights.safetensors");
        common::write_synthetic_weights(&weights, &fixture.recipe());
        let images = fixture.json("images");
        for which in ["prompt", "query"] {
            common::write_png(
                &dir.join(format!("{which}.png")),
                &image_from_meta(&images[which]),
            );
        }
        let (taps, out) = (dir.join("taps"), dir.join("out"));
        let output = metauas(&[
            "segment",
            "--weights",
            s(&weights),
            "--prompt",
            s(&dir.join("prompt.png")),
            "--query",
            s(&dir.join("query.png")),
            "--backend",
            "cpu",
            "--taps",
            s(&taps),
            "--out",
            s(&out),
            "--no-images",
        ]);
        assert!(output.status.success(), "{output:?}");
        let line: Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
        assert_eq!(line["taps"].as_str(), Some(s(&taps.join("query"))));
        Run {
            bundle: taps.join("query"),
            map: PathBuf::from(line["map"].as_str().unwrap()),
            weights,
            fixture,
        }
    })
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(fs::read(path).unwrap()))
}

#[test]
fn manifest_describes_every_tap_in_graph_order() {
    let run = run();
    let bundle = Bundle::open(&run.bundle).unwrap();
    let m = bundle.manifest.as_ref().unwrap();
    assert_eq!(m["format"], "metauas-taps");
    assert_eq!(m["size"], 256);
    assert_eq!(
        m["weights"]["sha256"].as_str().unwrap(),
        sha256_hex(&run.weights)
    );
    assert!(m["weights"]["fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("mw64:"));
    assert_eq!(m["inputs"]["query"]["width"], 280);
    let names: Vec<String> = bundle.entries.iter().map(|e| e.name.clone()).collect();
    assert_eq!(names, tap_names());
    for t in m["tensors"].as_array().unwrap() {
        let file = run.bundle.join(t["file"].as_str().unwrap());
        let (shape, data) = read_npy_f32(&file).unwrap();
        let declared: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(shape, declared, "{}", t["name"]);
        assert_eq!(
            (shape.len(), shape[0]),
            (4, 1),
            "{}: NCHW, N = 1",
            t["name"]
        );
        assert_eq!(
            t["bytes"].as_u64().unwrap(),
            fs::metadata(&file).unwrap().len()
        );
        assert!(data.iter().all(|v| v.is_finite()), "{}", t["name"]);
    }
    // The bundle's map is the map `segment` wrote, bit for bit.
    let (_, map) = read_npy_f32(&run.bundle.join("map.npy")).unwrap();
    let (_, segment_map) = read_npy_f32(&run.map).unwrap();
    assert_eq!(map, segment_map);
}

/// The fixture samples PyTorch's tensors at NCHW indices: our bundle's tensors, read at the
/// same indices, are within the conformance bound of the float64 truth (so names, layout and
/// values all line up with PyTorch's).
#[test]
fn bundle_matches_the_pytorch_fixture_within_the_conformance_bound() {
    let run = run();
    let fx = &run.fixture;
    let bundle = Bundle::open(&run.bundle).unwrap();
    let shapes = fx.json("taps");
    let recorded = fx.json("torch32_error");
    for tap in FIXTURE_TAPS {
        let name = bundle_name(tap);
        let entry = bundle.entries.iter().find(|e| e.name == name).unwrap();
        let array = bundle.read(entry).unwrap();
        let want: Vec<usize> = serde_json::from_value(shapes[tap].clone()).unwrap();
        assert_eq!(array.shape, want, "{name}: PyTorch's shape");
        let (idx, truth, _) = fx.tap(tap);
        let mut errors: Vec<f64> = idx
            .iter()
            .zip(&truth)
            .map(|(&i, t)| (array.values[i as usize] - t).abs())
            .collect();
        errors.sort_by(f64::total_cmp);
        let max = errors[errors.len() - 1];
        let p999 = errors[((errors.len() - 1) as f64 * 0.999).round() as usize];
        let tm = recorded[tap]["max_abs"].as_f64().unwrap();
        let tp = recorded[tap]["p999_abs"].as_f64().unwrap();
        assert!(
            max <= FACTOR * tm + SLACK && p999 <= FACTOR * tp + SLACK,
            "{name}: {max:.3e}/{p999:.3e} vs PyTorch {tm:.3e}/{tp:.3e}"
        );
    }
}

/// Copies the run's bundle to a fresh folder.
fn copy_bundle(label: &str) -> PathBuf {
    let dir = common::temp_dir(label).join("bundle");
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(&run().bundle).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn options(tol: f64) -> CompareOptions {
    CompareOptions {
        tol,
        metric: Metric::Rel,
    }
}

#[test]
fn a_bundle_equals_itself() {
    let a = Bundle::open(&run().bundle).unwrap();
    let report = compare(&a, &a, options(0.0), &mut |_, _| {});
    assert!(report.passed());
    assert_eq!(report.compared(), tap_names().len());
    for t in &report.tensors {
        let Outcome::Compared(e) = &t.outcome else {
            panic!("{}: {:?}", t.name, t.outcome)
        };
        assert_eq!(
            (e.max_abs, e.p999_abs, e.max_rel),
            (0.0, 0.0, 0.0),
            "{}",
            t.name
        );
        assert!((e.cosine - 1.0).abs() < 1e-12);
    }
    let out = metauas(&["compare", s(&run().bundle), s(&run().bundle), "--tol", "0"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn compare_names_the_perturbed_tensor_first() {
    let b = copy_bundle("perturbed");
    let name = "decoder.blocks.1.conv2";
    let file = b.join(format!("{name}.npy"));
    let (shape, mut data) = read_npy_f32(&file).unwrap();
    let scale = data.iter().fold(0f32, |m, v| m.max(v.abs()));
    data[777] += 0.01 * scale;
    write_npy_f32(&file, &data, &shape).unwrap();

    let report = compare(
        &Bundle::open(&run().bundle).unwrap(),
        &Bundle::open(&b).unwrap(),
        options(1e-4),
        &mut |_, _| {},
    );
    assert_eq!(report.first_failure().map(|t| t.name.as_str()), Some(name));
    assert_eq!(report.tensors.iter().filter(|t| t.fails).count(), 1);
    let Outcome::Compared(e) = &report.first_failure().unwrap().outcome else {
        panic!()
    };
    // max_rel is the change over the reference's own largest magnitude.
    let ref_max = data.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert!((e.max_abs - 0.01 * scale as f64).abs() < 1e-6 * scale as f64);
    assert!((e.max_rel - e.max_abs / ref_max).abs() < 1e-12);

    let out = metauas(&["compare", s(&run().bundle), s(&b)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let marked: Vec<&str> = text.lines().filter(|l| l.starts_with(">>")).collect();
    assert_eq!(marked.len(), 1, "{text}");
    assert!(marked[0].contains(name), "{text}");
    assert!(
        text.contains(&format!("first: {name} (module {name})")),
        "{text}"
    );
    let out = metauas(&["compare", s(&run().bundle), s(&b), "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["first_failure"], name);
    assert_eq!(json["passed"], false);
    // A looser tolerance passes it.
    let out = metauas(&["compare", s(&run().bundle), s(&b), "--tol", "0.02"]);
    assert!(out.status.success());
}

/// The report's single row for `name`.
fn row<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.contains("first:") && l.split_whitespace().any(|w| w == name))
        .collect()
}

#[test]
fn broken_tensors_are_one_row_each() {
    let b = copy_bundle("broken");
    // Another shape than A's (and than the manifest says): both reported.
    write_npy_f32(&b.join("alignment.0.npy"), &[0.0; 6], &[1, 2, 3]).unwrap();
    // A NaN.
    let file = b.join("decoder.blocks.2.npy");
    let (shape, mut data) = read_npy_f32(&file).unwrap();
    data[5] = f32::NAN;
    write_npy_f32(&file, &data, &shape).unwrap();
    // A truncated file.
    let file = b.join("query.encoder._blocks.9.npy");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    // A file the manifest names but that is gone.
    fs::remove_file(b.join("mask_head.npy")).unwrap();

    let out = metauas(&["compare", s(&run().bundle), s(&b)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let expect = [
        ("alignment.0", "the manifest declares"),
        ("decoder.blocks.2", "1 NaN/inf in B"),
        ("query.encoder._blocks.9", "truncated"),
        ("mask_head", "mask_head.npy: cannot read"),
    ];
    for (name, needle) in expect {
        let rows = row(&text, name);
        assert_eq!(rows.len(), 1, "{name}: {text}");
        assert!(rows[0].contains(needle), "{name}: {}", rows[0]);
    }
    assert!(text.contains("first: query.encoder._blocks.9"), "{text}");
    // Without a manifest the folder's .npy are read by name, and the shape mismatch is one.
    fs::remove_file(b.join("manifest.json")).unwrap();
    let out = metauas(&["compare", s(&run().bundle), s(&b)]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rows = row(&text, "alignment.0");
    assert!(
        rows[0].contains("shape [1, 896, 8, 8] in A, [1, 2, 3] in B"),
        "{text}"
    );
    assert!(row(&text, "mask_head")[0].contains("only in A"), "{text}");
}

#[test]
fn malformed_bundles_are_one_line_errors() {
    let good = s(&run().bundle).to_string();
    let dir = common::temp_dir("malformed");
    let empty = dir.join("empty");
    fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(
        &metauas(&["compare", &good, s(&empty)]),
        "not a bundle: no manifest.json and no .npy files",
    );
    assert_one_line_error(
        &metauas(&["compare", &good, s(&dir.join("missing"))]),
        "cannot open",
    );
    let cases = [
        ("notjson", "{\"format\": ", "not JSON"),
        ("format", "{\"format\": \"other\"}", "not a bundle manifest"),
        (
            "version",
            "{\"format\": \"metauas-taps\", \"version\": 9, \"tensors\": []}",
            "manifest version",
        ),
        (
            "escape",
            "{\"format\": \"metauas-taps\", \"version\": 1, \"tensors\": [{\"name\": \"x\", \"file\": \"../x.npy\"}]}",
            "not a plain .npy name",
        ),
        (
            "twice",
            "{\"format\": \"metauas-taps\", \"version\": 1, \"tensors\": [{\"name\": \"x\"}, {\"name\": \"x\"}]}",
            "listed twice",
        ),
    ];
    for (label, manifest, needle) in cases {
        let b = dir.join(label);
        fs::create_dir_all(&b).unwrap();
        fs::write(b.join("manifest.json"), manifest).unwrap();
        assert_one_line_error(&metauas(&["compare", &good, s(&b)]), needle);
    }
    let not_zip = dir.join("x.npz");
    fs::write(&not_zip, b"PK\x03\x04 not really").unwrap();
    assert_one_line_error(&metauas(&["compare", &good, s(&not_zip)]), "x.npz");
    assert_one_line_error(&metauas(&["compare", &good, &good, "--tol", "-1"]), "--tol");
}

/// numpy's `savez` layout: one stored `<name>.npy` member per array.
#[test]
fn npz_archives_compare_like_folders() {
    let dir = common::temp_dir("npz");
    let path = dir.join("b.npz");
    let file = fs::File::create(&path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    for name in ["map", "decoder.blocks.4", "extra"] {
        let src = run().bundle.join(format!("{name}.npy"));
        let bytes = if name == "extra" {
            fs::read(run().bundle.join("map.npy")).unwrap()
        } else {
            fs::read(src).unwrap()
        };
        zip.start_file(format!("{name}.npy"), stored).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.finish().unwrap();
    let report = compare(
        &Bundle::open(&run().bundle).unwrap(),
        &Bundle::open(&path).unwrap(),
        options(0.0),
        &mut |_, _| {},
    );
    assert!(report.passed(), "{}", report.to_text());
    assert_eq!(report.compared(), 2);
    let only_b: Vec<&str> = report
        .tensors
        .iter()
        .filter(|t| t.outcome == Outcome::OnlyIn("B"))
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(only_b, ["extra"]);
    let out = metauas(&["compare", s(&run().bundle), s(&path)]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn taps_refuse_a_bank_or_several_prompts() {
    let run = run();
    let dir = run.bundle.parent().unwrap().parent().unwrap();
    let (p, q) = (dir.join("prompt.png"), dir.join("query.png"));
    let out = metauas(&[
        "segment",
        "--weights",
        s(&run.weights),
        "--prompt",
        s(&p),
        "--prompt",
        s(&q),
        "--query",
        s(&q),
        "--backend",
        "cpu",
        "--taps",
        s(&dir.join("t2")),
        "--out",
        s(&dir.join("o2")),
    ]);
    assert_one_line_error(&out, "--taps needs exactly one --prompt image (got 2)");
    assert!(!dir.join("t2").exists());
}
