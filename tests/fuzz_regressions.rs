//! Every input a fuzz target ever crashed on (`fuzz/regressions/<target>/`), replayed through
//! the same calls and checks as the target (`fuzz/fuzz_targets/`), in the normal test suite.

use std::path::{Path, PathBuf};

use metauas::io::image::{decode_image_bytes_with, preprocess, resize_rgb8, ImageLimits};
use metauas::io::weights::{WeightFile, WeightLimits};
use metauas::model::PromptBank;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| {
                let path = e.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                (path, bytes)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

fn one_line(msg: &str, input: &Path) {
    assert!(
        !msg.contains('\n'),
        "{}: multi-line error {msg:?}",
        input.display()
    );
}

/// What `fuzz_targets/common.rs` does with a file that opened.
fn read_every_entry(file: &WeightFile) {
    let mut spent = 0usize;
    for info in file.entries() {
        let count = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = count
            .and_then(|n| n.checked_mul(info.dtype.size()))
            .unwrap_or(usize::MAX);
        spent = spent.saturating_add(bytes);
        if spent > 64 << 20 {
            break;
        }
        let data = file.tensor_data(&info.name);
        if let Ok(data) = &data {
            assert_eq!(data.shape(), info.shape.as_slice());
            assert_eq!(Some(data.len()), count);
        }
        if info.dtype.is_float() {
            let floats = file.tensor_f32(&info.name, &info.shape);
            assert_eq!(floats.is_ok(), data.is_ok(), "{}", info.name);
        }
        for err in [data.err()].into_iter().flatten() {
            assert!(!err.message().contains('\n'), "{err}");
        }
    }
}

fn weights_target(target: &str, label: &str) {
    for (path, bytes) in inputs(target) {
        match WeightFile::from_bytes(bytes, label, &WeightLimits::default()) {
            Ok(file) => read_every_entry(&file),
            Err(e) => one_line(e.message(), &path),
        }
    }
}

#[test]
fn safetensors_regressions() {
    weights_target("safetensors", "fuzz.safetensors");
}

#[test]
fn ckpt_regressions() {
    weights_target("ckpt", "fuzz.ckpt");
}

#[test]
fn image_regressions() {
    let limits = ImageLimits {
        max_pixels: 4_000_000,
        ..ImageLimits::default()
    };
    for (path, bytes) in inputs("image") {
        match decode_image_bytes_with(&bytes, "fuzz", &limits) {
            Ok(img) => {
                assert_eq!(img.data.len(), img.width * img.height * 3);
                assert!(preprocess(&img, 32).iter().all(|v| v.is_finite()));
                assert_eq!(resize_rgb8(&img, 7).data.len(), 7 * 7 * 3);
            }
            Err(e) => one_line(e.message(), &path),
        }
    }
}

#[test]
fn bank_regressions() {
    for (path, bytes) in inputs("bank") {
        if let Ok(file) = WeightFile::from_bytes(bytes, "fuzz.bank", &WeightLimits::default()) {
            match PromptBank::from_weight_file(&file) {
                Ok(bank) => assert!(bank
                    .entries()
                    .iter()
                    .all(|e| e.features.size == bank.size())),
                Err(e) => one_line(e.message(), &path),
            }
        }
    }
}

/// Finding 1 (ckpt, 107k executions in): a zip record name holding a newline made a two-line
/// error; every name from the archive is now escaped.
#[test]
fn archive_names_with_newlines_stay_on_one_line() {
    let input = inputs("ckpt")
        .into_iter()
        .find(|(p, _)| p.ends_with("newline-in-record-name"))
        .expect("regression input");
    let err = WeightFile::from_bytes(input.1, "fuzz.ckpt", &WeightLimits::default()).unwrap_err();
    assert!(err.message().contains("`a\\nchive/data.pkl`"), "{err}");
}

/// Finding 2 (image, 367 executions in): zune-jpeg's error text ends in a newline, which went
/// into our message as is; decoder messages are now folded onto one line (the input now goes
/// to libjpeg-turbo, whose messages must stay on one line too).
#[test]
fn decoder_messages_are_folded_onto_one_line() {
    let input = inputs("image")
        .into_iter()
        .find(|(p, _)| p.ends_with("jpeg-error-with-newline"))
        .expect("regression input");
    let err = decode_image_bytes_with(&input.1, "fuzz", &ImageLimits::default()).unwrap_err();
    assert!(
        err.message()
            .starts_with("fuzz: not a decodable image (JPEG: "),
        "{err}"
    );
    assert!(
        !err.message().contains('\n') && err.message().ends_with(')'),
        "{err:?}"
    );
}

/// Finding 3 (image, ~40k executions in): png 0.18.1 accepts a PLTE chunk whose length is
/// not a multiple of 3 and then panics (slice index) expanding it; such a palette is now
/// refused before the decoder sees it.
#[test]
fn a_png_palette_of_a_partial_entry_is_refused() {
    let input = inputs("image")
        .into_iter()
        .find(|(p, _)| p.ends_with("png-palette-not-multiple-of-3"))
        .expect("regression input");
    let err = decode_image_bytes_with(&input.1, "fuzz", &ImageLimits::default()).unwrap_err();
    assert_eq!(
        err.message(),
        "fuzz: not a decodable image (PNG palette of 49 bytes is not 1 to 256 RGB entries)"
    );
}
