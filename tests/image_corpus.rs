//! Every file of tests/fixtures/images decodes to exactly the RGB bytes Pillow's
//! `Image.open(f).convert('RGB')` (the upstream MetaUAS loader) gives, and what Pillow
//! refuses we refuse. The expectations (`pillow.tsv`) come from
//! tools/reference/make_image_fixtures.py, run with Pillow; this test never runs Python.

use std::path::{Path, PathBuf};

use metauas::io::image::{decode_image_bytes, decode_image_file};
use sha2::{Digest, Sha256};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

/// One row of pillow.tsv: a file and what Pillow made of it.
struct Expectation {
    file: String,
    /// `Some((width, height, sha256))`, or `None` when Pillow refused the file.
    pixels: Option<(usize, usize, String)>,
    pillow_error: String,
}

fn expectations() -> Vec<Expectation> {
    let text = std::fs::read_to_string(corpus_dir().join("pillow.tsv")).expect("pillow.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert!(f.len() >= 4, "pillow.tsv: short row {line:?}");
            let pixels = (f[1] != "error").then(|| {
                let n = |s: &str| s.parse::<usize>().expect("pillow.tsv: size");
                (n(f[1]), n(f[2]), f[3].to_string())
            });
            Expectation {
                file: f[0].to_string(),
                pixels,
                pillow_error: if f[1] == "error" {
                    f[3].to_string()
                } else {
                    String::new()
                },
            }
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn every_file_decodes_exactly_as_pillow() {
    let rows = expectations();
    assert!(rows.len() >= 50, "the corpus lost files: {}", rows.len());
    let mut failures = Vec::new();
    for row in &rows {
        let path = corpus_dir().join(&row.file);
        let from_file = decode_image_file(&path);
        let bytes = std::fs::read(&path).unwrap();
        let from_memory = decode_image_bytes(&bytes, &row.file);
        match (&row.pixels, from_file) {
            (Some((w, h, sha)), Ok(img)) => {
                let got = sha256_hex(&img.data);
                if (img.width, img.height) != (*w, *h) || &got != sha {
                    failures.push(format!(
                        "{}: decoded {}x{} sha256 {got}, Pillow {w}x{h} {sha}",
                        row.file, img.width, img.height
                    ));
                }
                assert_eq!(from_memory.as_ref().ok(), Some(&img), "{}", row.file);
            }
            (Some(_), Err(e)) => {
                failures.push(format!("{}: refused ({e}), Pillow decodes it", row.file))
            }
            (None, Ok(_)) => failures.push(format!(
                "{}: decoded, but Pillow refuses it ({})",
                row.file, row.pillow_error
            )),
            (None, Err(e)) => {
                let line = e.to_string();
                assert!(line.starts_with(&path.display().to_string()), "{line}");
                assert!(!line.contains('\n'), "{line}");
                assert!(from_memory.is_err(), "{}", row.file);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} files differ from Pillow:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn a_truncated_jpeg_is_refused_with_one_line_that_says_so() {
    let path = corpus_dir().join("truncated_40pct.jpg");
    let err = decode_image_file(&path).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    // Any cut of a real JPEG, wherever it falls, is refused, never filled in.
    let whole = std::fs::read(corpus_dir().join("pil_420_333x217.jpg")).unwrap();
    for percent in [1, 5, 10, 25, 50, 75, 90, 99] {
        let cut = &whole[..whole.len() * percent / 100];
        assert!(
            decode_image_bytes(cut, "cut.jpg").is_err(),
            "cut at {percent}% was decoded"
        );
    }
}
