//! Deployment features of the CLI: directories of queries with mirrored names, --jsonl,
//! masks, --no-images, prompt banks and several prompts (best / mean / min). Each map is
//! checked against the library run in-process on the same weights and images.

mod common;

use common::{assert_one_line_error, metauas, s};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use metauas::io::image::decode_image_file;
use metauas::io::output::read_npy_f32;
use metauas::model::bank::{cosine, pooled_f5};
use metauas::model::{Engine, PromptBank};
use metauas::synth::synthetic_image;

const SIZE: usize = 64;

struct Setup {
    dir: PathBuf,
    weights: PathBuf,
    other_weights: PathBuf,
    /// Normal images of two "products".
    prompts: [PathBuf; 2],
    /// queries/lineA/{cam1,cam2}/f.png, queries/lineA/g.png
    queries: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = common::temp_dir("deploy");
        let weights = dir.join("w.safetensors");
        // The conformance fixtures' "smooth" gains: maps that depend visibly on the prompt.
        let recipe = metauas::synth::WeightRecipe {
            gain_alignment: 14.0,
            gain_decoder: 1.5,
            gain_head: 4.0,
            ..common::default_recipe(3)
        };
        common::write_synthetic_weights(&weights, &recipe);
        let other_weights = dir.join("other.safetensors");
        common::write_synthetic_weights(&other_weights, &common::default_recipe(4));
        let prompts = [dir.join("good_a.png"), dir.join("good_b.png")];
        common::write_png(&prompts[0], &synthetic_image(1, 90, 70, None));
        common::write_png(&prompts[1], &synthetic_image(9, 64, 80, None));
        let queries = dir.join("queries");
        for (rel, seed) in [
            ("lineA/cam1/f.png", 2),
            ("lineA/cam2/f.png", 5),
            ("lineA/g.png", 6),
        ] {
            let p = queries.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            common::write_png(&p, &synthetic_image(seed, 72, 64, Some((20, 20, 12))));
        }
        std::fs::write(queries.join("lineA/notes.txt"), "not an image").unwrap();
        Setup {
            dir,
            weights,
            other_weights,
            prompts,
            queries,
        }
    })
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::from_file(&setup().weights, SIZE).unwrap())
}

fn ok(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn map_of(npy: &str) -> Vec<f32> {
    let (shape, data) = read_npy_f32(Path::new(npy)).unwrap();
    assert_eq!(shape, vec![SIZE, SIZE]);
    data
}

fn library_map(prompt: &Path, query: &Path) -> Vec<f32> {
    let e = engine();
    let p = e
        .encode_prompt(&decode_image_file(prompt).unwrap())
        .unwrap();
    e.segment(&p, &decode_image_file(query).unwrap())
        .unwrap()
        .data
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn directory_queries_mirror_colliding_names_and_write_jsonl_masks() {
    let st = setup();
    let out = common::temp_dir("deploy-dir");
    let jsonl = out.join("run.jsonl");
    let lines = ok(&metauas(&[
        "segment",
        "--weights",
        s(&st.weights),
        "--prompt",
        s(&st.prompts[0]),
        "--query",
        s(&st.queries),
        "--size",
        "64",
        "--backend",
        "cpu",
        "--out",
        s(&out),
        "--jsonl",
        s(&jsonl),
        "--threshold",
        "0.5",
        // Masks at the model's size, to compare them with the maps pixel for pixel.
        "--output-size",
        "model",
    ]));
    let expected = [
        ("cam1/f", "lineA/cam1/f.png"),
        ("cam2/f", "lineA/cam2/f.png"),
        ("g", "lineA/g.png"),
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:?}");
    for (line, (name, rel)) in lines.iter().zip(expected) {
        let query = st.queries.join(rel);
        assert_eq!(line["query"], s(&query));
        assert_eq!(line["prompt"], s(&st.prompts[0]));
        assert_eq!(line["map"], s(&out.join(format!("{name}.npy"))));
        let map = map_of(line["map"].as_str().unwrap());
        assert!(max_diff(&map, &library_map(&st.prompts[0], &query)) == 0.0);
        let mask = image::open(line["mask"].as_str().unwrap())
            .unwrap()
            .to_luma8();
        assert_eq!(mask.dimensions(), (64, 64));
        for (m, v) in mask.pixels().zip(&map) {
            assert_eq!(m.0[0], if *v >= 0.5 { 255 } else { 0 });
        }
        for suffix in ["heatmap", "overlay"] {
            assert!(out.join(format!("{name}_{suffix}.png")).is_file());
        }
    }
    let file: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(file, lines, "--jsonl holds the same lines as stdout");
}

#[test]
fn no_images_writes_only_maps_and_json() {
    let st = setup();
    let out = common::temp_dir("deploy-noimg");
    let q = st.queries.join("lineA/g.png");
    let lines = ok(&metauas(&[
        "segment",
        "--weights",
        s(&st.weights),
        "--prompt",
        s(&st.prompts[0]),
        "--query",
        s(&q),
        "--size",
        "64",
        "--backend",
        "cpu",
        "--out",
        s(&out),
        "--no-images",
        "--threshold",
        "0.5",
    ]));
    assert_eq!(lines.len(), 1);
    assert!(lines[0].get("mask").is_none());
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["g.npy"]);
}

#[test]
fn bank_build_then_segment_matches_encoding_the_prompts_again() {
    let st = setup();
    let out = common::temp_dir("deploy-bank");
    let bank = out.join("bank.safetensors");
    let built = metauas(&[
        "bank",
        "build",
        "--weights",
        s(&st.weights),
        "--images",
        s(&st.prompts[0]),
        s(&st.prompts[1]),
        "--size",
        "64",
        "--backend",
        "cpu",
        "--out",
        s(&bank),
    ]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let loaded = PromptBank::load(&bank, engine()).unwrap();
    let names: Vec<&str> = loaded.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["good_a", "good_b"]);
    assert_eq!(loaded.entries()[1].source, s(&st.prompts[1]));

    // Every mode through the bank equals the same mode through --prompt images.
    let q = st.queries.join("lineA/cam1/f.png");
    for mode in ["best", "mean", "min"] {
        let run = |prompt_args: &[&str], tag: &str| {
            let o = out.join(format!("{mode}-{tag}"));
            let mut args = vec!["segment", "--weights", s(&st.weights), "--query", s(&q)];
            args.extend_from_slice(prompt_args);
            args.extend([
                "--size",
                "64",
                "--backend",
                "cpu",
                "--multi-prompt",
                mode,
                "--out",
                s(&o),
            ]);
            let lines = ok(&metauas(&args));
            (
                map_of(lines[0]["map"].as_str().unwrap()),
                lines[0]["prompt"].clone(),
            )
        };
        let (from_bank, used_bank) = run(&["--bank", s(&bank)], "bank");
        let (from_files, _) = run(
            &["--prompt", s(&st.prompts[0]), "--prompt", s(&st.prompts[1])],
            "files",
        );
        assert_eq!(max_diff(&from_bank, &from_files), 0.0, "{mode}");
        if mode == "best" {
            assert!(used_bank.is_string());
        } else {
            assert_eq!(used_bank, serde_json::json!(["good_a", "good_b"]));
        }
    }
}

#[test]
fn multi_prompt_modes_agree_with_the_library() {
    let st = setup();
    let out = common::temp_dir("deploy-multi");
    let e = engine();
    let q = st.queries.join("lineA/cam2/f.png");
    let maps: Vec<Vec<f32>> = st.prompts.iter().map(|p| library_map(p, &q)).collect();
    let qimg = decode_image_file(&q).unwrap();
    let qpool = pooled_f5(&e.encode_prompt(&qimg).unwrap());
    let sims: Vec<f64> = st
        .prompts
        .iter()
        .map(|p| {
            cosine(
                &qpool,
                &pooled_f5(&e.encode_prompt(&decode_image_file(p).unwrap()).unwrap()),
            )
        })
        .collect();
    let best = if sims[1] > sims[0] { 1 } else { 0 };
    for mode in ["best", "mean", "min"] {
        let o = out.join(mode);
        let lines = ok(&metauas(&[
            "segment",
            "--weights",
            s(&st.weights),
            "--prompt",
            s(&st.prompts[0]),
            "--prompt",
            s(&st.prompts[1]),
            "--query",
            s(&q),
            "--size",
            "64",
            "--backend",
            "cpu",
            "--multi-prompt",
            mode,
            "--out",
            s(&o),
        ]));
        let got = map_of(lines[0]["map"].as_str().unwrap());
        let want: Vec<f32> = match mode {
            "best" => maps[best].clone(),
            "mean" => maps[0]
                .iter()
                .zip(&maps[1])
                .map(|(a, b)| (a + b) / 2.0)
                .collect(),
            _ => maps[0]
                .iter()
                .zip(&maps[1])
                .map(|(a, b)| a.min(*b))
                .collect(),
        };
        assert!(max_diff(&got, &want) <= 1e-7, "{mode}");
        if mode == "best" {
            assert_eq!(lines[0]["prompt"], s(&st.prompts[best]));
        }
    }
    // The two maps differ, so picking the wrong prompt (or averaging wrongly) would show.
    let spread = max_diff(&maps[0], &maps[1]);
    assert!(
        spread > 1e-4,
        "maps against the two prompts differ by only {spread}"
    );
}

#[test]
fn a_bank_for_other_weights_or_another_size_is_refused() {
    let st = setup();
    let out = common::temp_dir("deploy-bank-err");
    let bank = out.join("bank.safetensors");
    let built = metauas(&[
        "bank",
        "build",
        "--weights",
        s(&st.other_weights),
        "--images",
        s(&st.prompts[0]),
        "--size",
        "64",
        "--backend",
        "cpu",
        "--out",
        s(&bank),
    ]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let q = st.queries.join("lineA/g.png");
    let seg = |weights: &Path, size: &str| {
        metauas(&[
            "segment",
            "--weights",
            s(weights),
            "--bank",
            s(&bank),
            "--query",
            s(&q),
            "--size",
            size,
            "--backend",
            "cpu",
            "--out",
            s(&out),
        ])
    };
    assert_one_line_error(&seg(&st.weights, "64"), "other weights");
    let other_size = seg(&st.other_weights, "96");
    assert_one_line_error(&other_size, "--size 96: ");
    assert_one_line_error(
        &other_size,
        "bank was built at size 64, this engine runs at size 96",
    );
    // Weights files are not banks, and banks are not weights.
    let not_bank = metauas(&[
        "segment",
        "--weights",
        s(&st.weights),
        "--bank",
        s(&st.weights),
        "--query",
        s(&q),
        "--size",
        "64",
        "--backend",
        "cpu",
        "--out",
        s(&out),
    ]);
    assert_one_line_error(&not_bank, "not a prompt bank");
}

#[test]
fn bad_deploy_inputs_get_one_line_errors() {
    let st = setup();
    let out = common::temp_dir("deploy-errs");
    let empty = st.dir.join("empty-dir");
    std::fs::create_dir_all(&empty).unwrap();
    let base = [
        "segment",
        "--weights",
        s(&st.weights),
        "--size",
        "64",
        "--backend",
        "cpu",
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        args.extend(["--out", s(&out)]);
        metauas(&args)
    };
    let q = st.queries.join("lineA/g.png");
    assert_one_line_error(
        &run(&["--prompt", s(&st.prompts[0]), "--query", s(&empty)]),
        "no image files",
    );
    assert_one_line_error(&run(&["--query", s(&q)]), "--prompt");
    assert_one_line_error(
        &run(&[
            "--prompt",
            s(&st.prompts[0]),
            "--query",
            s(&q),
            "--threshold",
            "nan",
        ]),
        "--threshold",
    );
    assert_one_line_error(
        &run(&[
            "--prompt",
            s(&st.prompts[0]),
            "--query",
            s(&q),
            "--multi-prompt",
            "max",
        ]),
        "max",
    );
    let bank_missing = run(&[
        "--bank",
        s(&st.dir.join("nope.safetensors")),
        "--query",
        s(&q),
    ]);
    assert_one_line_error(&bank_missing, "nope.safetensors");
    // --jsonl may not overwrite an input.
    let clobber = run(&[
        "--prompt",
        s(&st.prompts[0]),
        "--query",
        s(&q),
        "--jsonl",
        s(&q),
    ]);
    assert_one_line_error(&clobber, "--jsonl");
    // A bank build from a folder with no images, or with a bad image, writes nothing.
    let bank = out.join("b.safetensors");
    let no_images = metauas(&[
        "bank",
        "build",
        "--weights",
        s(&st.weights),
        "--images",
        s(&empty),
        "--size",
        "64",
        "--out",
        s(&bank),
    ]);
    assert_one_line_error(&no_images, "no image files");
    let bad = st.dir.join("bad.png");
    std::fs::write(&bad, b"\x89PNG not really").unwrap();
    let bad_image = metauas(&[
        "bank",
        "build",
        "--weights",
        s(&st.weights),
        "--images",
        s(&bad),
        "--size",
        "64",
        "--backend",
        "cpu",
        "--out",
        s(&bank),
    ]);
    assert_one_line_error(&bad_image, "bad.png");
    assert!(!bank.exists());
}

#[test]
fn a_bad_query_in_a_directory_does_not_lose_the_others() {
    let st = setup();
    let dir = common::temp_dir("deploy-mixed");
    let good = dir.join("a.png");
    std::fs::copy(st.queries.join("lineA/g.png"), &good).unwrap();
    std::fs::write(dir.join("b.png"), b"garbage").unwrap();
    let out = common::temp_dir("deploy-mixed-out");
    let run = metauas(&[
        "segment",
        "--weights",
        s(&st.weights),
        "--prompt",
        s(&st.prompts[0]),
        "--query",
        s(&dir),
        "--size",
        "64",
        "--backend",
        "cpu",
        "--out",
        s(&out),
    ]);
    assert!(!run.status.success());
    let lines: Vec<&str> = std::str::from_utf8(&run.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 1, "the good query's line is there");
    assert!(lines[0].contains("a.png"));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.lines().any(|l| l.contains("b.png")), "{stderr}");
    assert!(out.join("a.npy").is_file());
}
