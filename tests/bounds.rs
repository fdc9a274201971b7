//! Resource bounds and integrity: every limit on hostile input has a test here (or, for the
//! limits internal to a parser, in its module: `src/io/weights/pickle.rs`), with the one-line
//! error that names the file and the limit. Defaults are listed in README.md, "Limits".

mod common;

use common::png_claiming;

use std::io::Write;
use std::path::{Path, PathBuf};

use metauas::io::image::{
    decode_image_bytes_with, decode_image_file_with, ImageLimits, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE,
};
use metauas::io::output::write_atomic;
use metauas::io::weights::{
    write_safetensors, TensorData, WeightFile, WeightLimits, MAX_HEADER_BYTES, MAX_TENSORS,
    MAX_WEIGHTS_FILE_BYTES,
};
use metauas::model::bank::MAX_BANK_PROMPTS;
use metauas::model::PromptBank;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |key| {
        vars.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

fn one_line(msg: &str) {
    assert!(!msg.contains('\n'), "{msg}");
}

// ------------------------------------------------------------------ images

/// A real 8x8 JPEG whose SOF0 header is edited to claim `width x height`.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .unwrap();
    let mut bytes = out.into_inner();
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("baseline SOF0 marker");
    // FFC0, length (2), precision (1), height (2), width (2).
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bytes
}

/// A BMP header (54 bytes, 24-bit, no pixel data) claiming `width x height`.
fn bmp_claiming(width: i32, height: i32) -> Vec<u8> {
    let mut b = b"BM".to_vec();
    b.extend_from_slice(&54u32.to_le_bytes()); // file size (a lie: no pixels follow)
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
    b.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER
    b.extend_from_slice(&width.to_le_bytes());
    b.extend_from_slice(&height.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // planes
    b.extend_from_slice(&24u16.to_le_bytes()); // bits per pixel
    b.extend_from_slice(&[0; 24]); // no compression, sizes, resolution, palette
    b
}

#[test]
fn image_defaults_and_overrides() {
    assert_eq!(MAX_IMAGE_PIXELS, 100_000_000);
    assert_eq!(MAX_IMAGE_SIDE, 65_535);
    let d = ImageLimits::default();
    assert_eq!(
        (d.max_pixels, d.max_side),
        (MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE)
    );
    assert_eq!(ImageLimits::from_lookup(lookup(&[])).unwrap(), d);
    let l = ImageLimits::from_lookup(lookup(&[
        ("METAUAS_MAX_IMAGE_PIXELS", "400000000"),
        ("METAUAS_MAX_IMAGE_SIDE", "100000"),
    ]))
    .unwrap();
    assert_eq!((l.max_pixels, l.max_side), (400_000_000, 100_000));
    for bad in ["lots", "-1", "0", "1e9"] {
        let err = ImageLimits::from_lookup(lookup(&[("METAUAS_MAX_IMAGE_PIXELS", bad)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("environment variable METAUAS_MAX_IMAGE_PIXELS=")
                && err.ends_with("is not a positive whole number"),
            "{err}"
        );
    }
}

#[test]
fn a_tiny_png_claiming_100000_squared_pixels_is_refused_before_allocating() {
    let bomb = png_claiming(100_000, 100_000);
    assert_eq!(bomb.len(), 45);
    // Allowed sides: the pixel count is what refuses it (it would be 30 GB of RGB).
    let wide = ImageLimits {
        max_side: 1 << 20,
        ..ImageLimits::default()
    };
    let err = decode_image_bytes_with(&bomb, "bomb.png", &wide).unwrap_err();
    assert_eq!(
        err.to_string(),
        "bomb.png: image is 100000 x 100000 pixels, over the limit of 100000000 pixels (raise it with METAUAS_MAX_IMAGE_PIXELS)"
    );
    // Under the defaults the side limit speaks first.
    let err = decode_image_bytes_with(&bomb, "bomb.png", &ImageLimits::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "bomb.png: image is 100000 x 100000 pixels, over the limit of 65535 pixels a side (raise it with METAUAS_MAX_IMAGE_SIDE)"
    );
    // From a file, the path is named.
    let dir = common::temp_dir("bounds-bomb");
    let path = dir.join("bomb.png");
    std::fs::write(&path, &bomb).unwrap();
    let err = decode_image_file_with(&path, &wide)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: image is 100000 x 100000", path.display())),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn jpeg_and_bmp_headers_claiming_huge_images_are_refused() {
    let limits = ImageLimits::default();
    let sane = jpeg_claiming(8, 8);
    assert!(decode_image_bytes_with(&sane, "ok.jpg", &limits).is_ok());
    let err = decode_image_bytes_with(&jpeg_claiming(60_000, 60_000), "bomb.jpg", &limits)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "bomb.jpg: image is 60000 x 60000 pixels, over the limit of 100000000 pixels (raise it with METAUAS_MAX_IMAGE_PIXELS)"
    );
    let err = decode_image_bytes_with(&bmp_claiming(50_000, 50_000), "bomb.bmp", &limits)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "bomb.bmp: image is 50000 x 50000 pixels, over the limit of 100000000 pixels (raise it with METAUAS_MAX_IMAGE_PIXELS)"
    );
    let err = decode_image_bytes_with(&png_claiming(70_000, 2), "long.png", &limits)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("over the limit of 65535 pixels a side"),
        "{err}"
    );
}

#[test]
fn a_lowered_image_limit_applies_to_real_files() {
    let path = root().join("tests/fixtures/images/rgb.bmp"); // 16 x 12
    let tight = ImageLimits {
        max_pixels: 191,
        max_side: 100,
    };
    let err = decode_image_file_with(&path, &tight)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("image is 16 x 12 pixels, over the limit of 191 pixels (raise it with METAUAS_MAX_IMAGE_PIXELS)"),
        "{err}"
    );
    let exact = ImageLimits {
        max_pixels: 192,
        max_side: 16,
    };
    assert!(decode_image_file_with(&path, &exact).is_ok());
    let narrow = ImageLimits {
        max_pixels: 192,
        max_side: 15,
    };
    let err = decode_image_file_with(&path, &narrow)
        .unwrap_err()
        .to_string();
    assert!(err.contains("over the limit of 15 pixels a side"), "{err}");
}

// ------------------------------------------------------------------ weights

fn tiny_safetensors() -> PathBuf {
    root().join("fuzz/seeds/safetensors/tiny.safetensors")
}

#[test]
fn weights_defaults_and_overrides() {
    assert_eq!(MAX_WEIGHTS_FILE_BYTES, 64 << 30);
    assert_eq!(MAX_TENSORS, 100_000);
    assert_eq!(MAX_HEADER_BYTES, 16 << 20);
    let d = WeightLimits::default();
    assert_eq!(
        (d.max_file_bytes, d.max_tensors),
        (MAX_WEIGHTS_FILE_BYTES, MAX_TENSORS)
    );
    assert_eq!(WeightLimits::from_lookup(lookup(&[])).unwrap(), d);
    let l = WeightLimits::from_lookup(lookup(&[
        ("METAUAS_MAX_WEIGHTS_BYTES", "1000"),
        ("METAUAS_MAX_TENSORS", " 7 "),
    ]))
    .unwrap();
    assert_eq!((l.max_file_bytes, l.max_tensors), (1000, 7));
    let err = WeightLimits::from_lookup(lookup(&[("METAUAS_MAX_TENSORS", "many")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("METAUAS_MAX_TENSORS"), "{err}");
}

#[test]
fn weights_file_size_limit() {
    let path = tiny_safetensors();
    let len = std::fs::metadata(&path).unwrap().len();
    let tight = WeightLimits {
        max_file_bytes: len - 1,
        ..WeightLimits::default()
    };
    let err = WeightFile::open_with(&path, &tight)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: file is {len} bytes, over the limit of {} bytes (raise it with METAUAS_MAX_WEIGHTS_BYTES)",
            path.display(),
            len - 1
        )
    );
    let bytes = std::fs::read(&path).unwrap();
    let err = WeightFile::from_bytes(bytes.clone(), "upload", &tight)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("upload: file is "), "{err}");
    let exact = WeightLimits {
        max_file_bytes: len,
        ..WeightLimits::default()
    };
    assert!(WeightFile::open_with(&path, &exact).is_ok());
    assert!(WeightFile::from_bytes(bytes, "upload", &exact).is_ok());
}

#[test]
fn tensor_count_limit_for_safetensors_and_checkpoints() {
    let tight = WeightLimits {
        max_tensors: 3,
        ..WeightLimits::default()
    };
    let path = tiny_safetensors(); // 4 tensors
    let err = WeightFile::open_with(&path, &tight)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: not a valid safetensors file: header declares 4 tensors, over the limit of 3 (raise it with METAUAS_MAX_TENSORS)",
            path.display()
        )
    );
    let four = WeightLimits {
        max_tensors: 4,
        ..WeightLimits::default()
    };
    assert!(WeightFile::open_with(&path, &four).is_ok());

    let ckpt = root().join("tests/fixtures/ckpt/small_state_dict.pt");
    let n = WeightFile::open(&ckpt).unwrap().entries().len();
    assert!(n > 3);
    let err = WeightFile::open_with(&ckpt, &tight)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: file declares {n} tensors, over the limit of 3 (raise it with METAUAS_MAX_TENSORS)",
            ckpt.display()
        )
    );
}

#[test]
fn safetensors_header_length_limit() {
    let mut bytes = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    let err = WeightFile::from_bytes(bytes, "huge-header", &WeightLimits::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "huge-header: not a valid safetensors file: header length {} is larger than the limit of {}",
            MAX_HEADER_BYTES + 1,
            MAX_HEADER_BYTES
        )
    );
}

/// A header under the byte limit that holds millions of tiny JSON values (which would parse
/// into hundreds of MB) is refused by counting separators first; commas inside strings
/// (metadata such as a bank's names) do not count.
#[test]
fn a_header_of_many_tiny_json_values_is_refused_before_parsing() {
    let header = format!("{{\"x\":[{}0]}}", "0,".repeat(2_000_000));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let err = WeightFile::from_bytes(bytes, "flat", &WeightLimits::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("more JSON values than 100000 tensors need"),
        "{err}"
    );

    let names = format!("[{}]", "\"a,b:c\\\",\",".repeat(1_000_000)); // 3M separators inside one string
    let meta = vec![("names".to_string(), names)];
    let dir = std::env::temp_dir().join(format!("metauas-bounds-sep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("commas-in-strings.safetensors");
    let t = vec![(
        "w".to_string(),
        TensorData::F32 {
            shape: vec![2],
            data: vec![1.0, 2.0],
        },
    )];
    write_safetensors(&path, &t, &meta).unwrap();
    let file = WeightFile::open(&path).expect("commas inside strings are not values");
    assert_eq!(file.entries().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn zip_with_pickle(pickle: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pickle).unwrap();
    w.finish().unwrap().into_inner()
}

/// The pickle machine's stack and memo limits at their real defaults, through the whole
/// reader (the object limit, 4M, is tested with lowered limits in pickle.rs).
#[test]
fn pickle_stack_and_memo_limits() {
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(b'N', (1 << 20) + 1));
    p.push(b'.');
    let err = WeightFile::from_bytes(zip_with_pickle(&p), "deep.pt", &WeightLimits::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("deep.pt: ")
            && err.ends_with("pickle stack deeper than the limit of 1048576"),
        "{err}"
    );
    one_line(&err);

    let mut p = b"\x80\x02N".to_vec();
    p.extend(std::iter::repeat_n(0x94u8, (1 << 20) + 1));
    p.push(b'.');
    let err = WeightFile::from_bytes(zip_with_pickle(&p), "memo.pt", &WeightLimits::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("memo.pt: ")
            && err.ends_with("pickle memo larger than the limit of 1048576 entries"),
        "{err}"
    );
}

// ------------------------------------------------------------------ banks

#[test]
fn a_bank_claiming_more_prompts_than_the_maximum_is_refused() {
    assert_eq!(MAX_BANK_PROMPTS, 4096);
    let dir = common::temp_dir("bounds-bank");
    let path = dir.join("huge.bank");
    let count = MAX_BANK_PROMPTS + 1;
    let names: Vec<String> = (0..count).map(|i| format!("p{i}")).collect();
    let names = serde_json::to_string(&names).unwrap();
    let meta: Vec<(String, String)> = [
        ("format", "metauas-prompt-bank"),
        ("version", "1"),
        ("weights_hash", "mw64:0000000000000000"),
        ("size", "32"),
        ("count", &count.to_string()),
        ("names", &names),
        ("sources", &names),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    write_safetensors(&path, &[], &meta).unwrap();
    let file = WeightFile::open(&path).unwrap();
    let err = PromptBank::from_weight_file(&file).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: bank holds 4097 prompts, more than the maximum 4096",
            path.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_seed_bank_reads_and_its_fingerprint_is_recorded() {
    let path = root().join("fuzz/seeds/bank/tiny.bank");
    let file = WeightFile::open(&path).unwrap();
    let bank = PromptBank::from_weight_file(&file).unwrap();
    assert_eq!((bank.len(), bank.size()), (2, 32));
    assert!(bank.weights_hash().starts_with("mw64:"));
    // A bank that lost its tail is refused, never half-read.
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100] {
        let err = WeightFile::from_bytes(bytes[..cut].to_vec(), "cut.bank", &Default::default())
            .map(|f| PromptBank::from_weight_file(&f).map(|_| ()))
            .and_then(|r| r)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cut.bank: "), "{err}");
        one_line(&err);
    }
}

// ------------------------------------------------------------------ integrity

/// Every truncation of a safetensors file is refused (the entries must tile the data section
/// exactly), and so is every single-bit flip in its header and length prefix except those
/// the format cannot see (inside a name or the metadata value, or JSON whitespace).
#[test]
fn truncated_or_bit_flipped_safetensors_are_rejected() {
    let bytes = std::fs::read(tiny_safetensors()).unwrap();
    let limits = WeightLimits::default();
    for cut in 0..bytes.len() {
        assert!(
            WeightFile::from_bytes(bytes[..cut].to_vec(), "cut", &limits).is_err(),
            "truncated at {cut} still opened"
        );
    }
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut accepted = 0;
    for i in 0..header_end {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1 << bit;
            if let Ok(file) = WeightFile::from_bytes(flipped, "flip", &limits) {
                accepted += 1;
                // What still opens still describes every byte of the data exactly.
                for info in file.entries() {
                    file.tensor_data(&info.name).unwrap();
                }
            }
        }
    }
    // The length prefix alone has 64 bits: all refused. Most header flips break the JSON or
    // the offset table; a few land in a name or the metadata text.
    assert!(
        accepted < header_end * 8 / 4,
        "{accepted} of {} flips accepted",
        header_end * 8
    );
}

// ------------------------------------------------------------------ atomic writes

/// A file name whose temporary sibling (`.<name>.<pid>.<n>.tmp`) is longer than the file
/// system allows: the write fails after validation, at the temp file, as a crash would.
fn long_name(dir: &Path) -> PathBuf {
    dir.join(format!("{}.out", "x".repeat(240)))
}

#[test]
fn failed_writes_leave_nothing_behind_and_never_clobber() {
    let dir = common::temp_dir("bounds-atomic");
    // A missing directory: an error naming the path, no file anywhere.
    let missing = dir.join("no/such/dir/map.npy");
    let err = write_atomic(&missing, b"data").unwrap_err().to_string();
    assert!(err.starts_with(&missing.display().to_string()), "{err}");
    assert!(!missing.exists());

    // An existing output survives a failed rewrite, byte for byte, and no temp file is left.
    let target = long_name(&dir);
    std::fs::write(&target, b"previous contents").unwrap();
    let err = write_atomic(&target, b"new contents")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot write"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"previous contents");

    let tensors = vec![(
        "w".to_string(),
        TensorData::F32 {
            shape: vec![2],
            data: vec![1.0, 2.0],
        },
    )];
    let err = write_safetensors(&target, &tensors, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot write safetensors file"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"previous contents");
    // Invalid tensors are refused before anything is written.
    let bad = vec![(
        "w".to_string(),
        TensorData::F32 {
            shape: vec![3],
            data: vec![1.0],
        },
    )];
    let ok_path = dir.join("w.safetensors");
    assert!(write_safetensors(&ok_path, &bad, &[]).is_err());
    assert!(!ok_path.exists());

    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![target.file_name().unwrap().to_string_lossy().into_owned()]
    );

    // A successful write replaces the file whole.
    let short = dir.join("map.bin");
    write_atomic(&short, b"one").unwrap();
    write_atomic(&short, b"two!").unwrap();
    assert_eq!(std::fs::read(&short).unwrap(), b"two!");
    let _ = std::fs::remove_dir_all(&dir);
}
