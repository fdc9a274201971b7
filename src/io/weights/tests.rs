//! Tests of the weights loader against fixtures written by real `torch.save` and the
//! `safetensors` package (tools/reference/make_ckpt_fixtures.py), plus hand-built files.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;
use crate::util::rng::SplitMix64;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ckpt")
        .join(name)
}

/// A fresh scratch directory per test (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("metauas-weights-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_err(path: &Path) -> String {
    match WeightFile::open(path) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn views_metadata(file: &WeightFile) -> serde_json::Map<String, serde_json::Value> {
    let (_, text) = file
        .metadata()
        .iter()
        .find(|(k, _)| k == "views")
        .expect("views metadata");
    serde_json::from_str(text).unwrap()
}

fn as_usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn weight_file_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<WeightFile>();
    let file = WeightFile::open(&fixture("metauas_strided.ckpt")).unwrap();
    let sums: Vec<f32> = std::thread::scope(|s| {
        let handles: Vec<_> = file.entries()[..8]
            .iter()
            .map(|info| s.spawn(|| file.tensor_data(&info.name).map(|d| d.len() as f32)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    assert_eq!(sums.len(), 8);
}

// ------------------------------------------------------------------ small_state_dict.pt
#[test]
fn small_state_dict_matches_expected_values_exactly() {
    let ckpt = WeightFile::open(&fixture("small_state_dict.pt")).unwrap();
    let expected = WeightFile::open(&fixture("small_state_dict.expected.safetensors")).unwrap();
    assert_eq!(ckpt.format(), Format::TorchZip);
    assert_eq!(expected.format(), Format::Safetensors);
    assert_eq!(
        ckpt.entries(),
        expected.entries(),
        "names, dtypes and shapes"
    );
    assert_eq!(ckpt.entries().len(), 17);
    for info in ckpt.entries() {
        let got = ckpt.tensor_data(&info.name).unwrap();
        let want = expected.tensor_data(&info.name).unwrap();
        assert_eq!(got, want, "{}", info.name);
        if info.dtype.is_float() {
            let got = ckpt.tensor_f32(&info.name, &info.shape).unwrap();
            let want = expected.tensor_f32(&info.name, &info.shape).unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}",
                info.name
            );
        }
    }
}

#[test]
fn small_state_dict_dtypes_and_known_values() {
    let ckpt = WeightFile::open(&fixture("small_state_dict.pt")).unwrap();
    let dtype = |n: &str| ckpt.entry(n).unwrap().dtype;
    assert_eq!(dtype("encoder._conv_stem.weight"), DType::F32);
    assert_eq!(dtype("decoder.blocks.0.conv1.1.weight"), DType::F16);
    assert_eq!(dtype("decoder.blocks.0.conv1.1.bias"), DType::BF16);
    assert_eq!(
        dtype("alignment.0.alignment_layer.dimensionality_reduction.bias"),
        DType::F64
    );
    assert_eq!(dtype("decoder.int32_table"), DType::I32);
    assert_eq!(
        ckpt.tensor_data("encoder._bn0.num_batches_tracked")
            .unwrap(),
        TensorData::I64 {
            shape: vec![],
            data: vec![123_456_789_012]
        }
    );
    assert_eq!(
        ckpt.tensor_data("decoder.int32_table").unwrap(),
        TensorData::I32 {
            shape: vec![3, 4],
            data: (-3..9).collect()
        }
    );
    assert_eq!(ckpt.tensor_f32("mask_head.bias", &[1]).unwrap(), vec![0.25]);
    assert_eq!(ckpt.tensor_f32("scalar.float", &[]).unwrap(), vec![-1.5]);
    assert_eq!(
        ckpt.tensor_f32("empty", &[0, 3]).unwrap(),
        Vec::<f32>::new()
    );
    // The expanded (stride 0) entry repeats one row.
    let rows = ckpt.tensor_f32("decoder.expanded", &[4, 5]).unwrap();
    assert!(rows.chunks(5).all(|r| r == &rows[..5]));
    // Offset view: bias is base[5:], running_mean is base[:48] of the same storage.
    let bias = ckpt.tensor_f32("encoder._bn0.bias", &[48]).unwrap();
    let mean = ckpt.tensor_f32("encoder._bn0.running_mean", &[48]).unwrap();
    assert_eq!(bias[..43], mean[5..]);
}

#[test]
fn small_state_dict_views_are_what_torch_load_sees() {
    let ckpt = WeightFile::open(&fixture("small_state_dict.pt")).unwrap();
    let expected = WeightFile::open(&fixture("small_state_dict.expected.safetensors")).unwrap();
    let views = views_metadata(&expected);
    let Source::TorchZip(src) = &ckpt.source else {
        panic!("not a torch zip")
    };
    let mut record_of_group: BTreeMap<u64, String> = BTreeMap::new();
    for (index, info) in ckpt.entries().iter().enumerate() {
        let (record, view) = src.view_of(index).unwrap();
        let v = views[&info.name].as_array().unwrap();
        assert_eq!(
            view.offset,
            v[1].as_u64().unwrap() as usize,
            "{}",
            info.name
        );
        // torch reports any stride for a size-1 dim; compare the dims that matter.
        let want_stride = as_usizes(&v[2]);
        assert_eq!(view.stride.len(), want_stride.len(), "{}", info.name);
        for (d, (&n, (&got, &want))) in view
            .shape
            .iter()
            .zip(view.stride.iter().zip(&want_stride))
            .enumerate()
        {
            if n > 1 {
                assert_eq!(got, want, "{} dim {d}", info.name);
            }
        }
        // Entries share a storage record exactly when torch says they share a storage.
        let group = v[3].as_u64().unwrap();
        let known = record_of_group
            .entry(group)
            .or_insert_with(|| record.to_string());
        assert_eq!(known, record, "{}", info.name);
    }
    let groups: std::collections::BTreeSet<_> = record_of_group.values().collect();
    assert_eq!(
        groups.len(),
        record_of_group.len(),
        "distinct groups, distinct records"
    );
    let (_, transposed) = src
        .view_of(
            ckpt.entries()
                .iter()
                .position(|e| e.name == "decoder.transposed_view")
                .unwrap(),
        )
        .unwrap();
    assert_eq!(transposed.stride, vec![1, 48]);
}

// ------------------------------------------------------------------ hostile files
#[test]
fn hostile_checkpoints_are_refused_with_a_reason() {
    let cases = [
        (
            "evil_system.pt",
            "forbidden global `posix.system` (refusing to run code",
        ),
        ("evil_builtins_eval.pt", "forbidden global `builtins.eval`"),
        ("evil_stack_global.pt", "forbidden global `os.system`"),
        ("evil_nested_reduce.pt", "forbidden global `posix.system`"),
        ("truncated.pt", "not a readable zip archive"),
        ("missing_storage.pt", "is missing from the archive"),
        ("view_out_of_bounds.pt", "entry `mask_head.bias`"),
        ("not_a_zip.pt", "unrecognized weights format"),
    ];
    for (name, needle) in cases {
        let path = fixture(name);
        let err = open_err(&path);
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
    let err = open_err(&fixture("view_out_of_bounds.pt"));
    assert!(
        err.contains("reaches element 2 of a storage holding 1 elements"),
        "{err}"
    );
    assert!(!Path::new("/tmp/metauas_checkpoint_code_was_executed").exists());
}

// ------------------------------------------------------------------ metauas_strided.ckpt
fn official_entries() -> Vec<(String, Vec<usize>, String)> {
    let tsv = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/metauas_state_dict.tsv");
    std::fs::read_to_string(tsv)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            let shape = cols[1]
                .trim_matches(|c| c == '(' || c == ')')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect();
            (cols[0].to_string(), shape, cols[2].to_string())
        })
        .collect()
}

/// Entry values recomputed from the storages: element idx = offset + sum(i_d * stride_d).
fn recompute(storage: &[f32], offset: usize, shape: &[usize], stride: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|flat| {
            let mut rest = flat;
            let mut at = offset;
            for d in (0..shape.len()).rev() {
                at += (rest % shape[d]) * stride[d];
                rest /= shape[d];
            }
            storage[at]
        })
        .collect()
}

#[test]
fn strided_full_checkpoint_matches_its_definition() {
    let ckpt = WeightFile::open(&fixture("metauas_strided.ckpt")).unwrap();
    let storages = WeightFile::open(&fixture("metauas_strided.storages.safetensors")).unwrap();
    let official = official_entries();
    assert_eq!(official.len(), 820);
    assert_eq!(ckpt.entries().len(), 820);
    for (name, shape, dtype) in &official {
        let info = ckpt.entry(name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(&info.shape, shape, "{name}");
        let want = if dtype == "int64" {
            DType::I64
        } else {
            DType::F32
        };
        assert_eq!(info.dtype, want, "{name}");
    }
    let views = views_metadata(&storages);
    let mut pools: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for (name, shape, dtype) in &official {
        let v = views[name.as_str()].as_array().unwrap();
        let pool = v[0].as_str().unwrap();
        let offset = v[1].as_u64().unwrap() as usize;
        let stride = as_usizes(&v[2]);
        if dtype == "int64" {
            let TensorData::I64 { data: counters, .. } =
                storages.tensor_data(&format!("storage.{pool}")).unwrap()
            else {
                panic!("counters are int64")
            };
            let got = ckpt.tensor_data(name).unwrap();
            assert_eq!(
                got,
                TensorData::I64 {
                    shape: vec![],
                    data: vec![counters[offset]]
                }
            );
            continue;
        }
        let storage = pools.entry(pool.to_string()).or_insert_with(|| {
            let key = format!("storage.{pool}");
            let n = storages.entry(&key).unwrap().shape[0];
            storages.tensor_f32(&key, &[n]).unwrap()
        });
        let got = ckpt.tensor_f32(name, shape).unwrap();
        assert_eq!(got, recompute(storage, offset, shape, &stride), "{name}");
    }
    // A few entries materialized by torch itself.
    let mut checked = 0;
    for info in storages.entries() {
        if let Some(name) = info.name.strip_prefix("expected.") {
            let want = storages.tensor_f32(&info.name, &info.shape).unwrap();
            assert_eq!(ckpt.tensor_f32(name, &info.shape).unwrap(), want, "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 5);
}

#[test]
fn missing_entry_and_wrong_shape_errors_name_both_shapes() {
    let ckpt = WeightFile::open(&fixture("metauas_strided.ckpt")).unwrap();
    let err = ckpt
        .tensor_f32("encoder._nope.weight", &[48, 3, 3, 3])
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("metauas_strided.ckpt: missing entry `encoder._nope.weight` (expected shape [48, 3, 3, 3])"),
        "{err}"
    );
    let err = ckpt
        .tensor_f32("encoder._conv_stem.weight", &[48, 3, 3])
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with(
            "entry `encoder._conv_stem.weight` has shape [48, 3, 3, 3], expected [48, 3, 3]"
        ),
        "{err}"
    );
    let err = ckpt
        .tensor_f32("encoder._bn0.num_batches_tracked", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("I64, not a floating-point type"), "{err}");
}

// ------------------------------------------------------------------ convert
#[test]
fn convert_round_trip_keeps_every_entry_and_value() {
    let scratch = Scratch::new("convert");
    for source in ["metauas_strided.ckpt", "small_state_dict.pt"] {
        let input = fixture(source);
        let output = scratch.0.join(format!("{source}.safetensors"));
        let n = convert_to_safetensors(&input, &output).unwrap();
        let a = WeightFile::open(&input).unwrap();
        let b = WeightFile::open(&output).unwrap();
        assert_eq!(b.format(), Format::Safetensors);
        assert_eq!(n, a.entries().len());
        assert_eq!(
            a.entries(),
            b.entries(),
            "names, dtypes (f16/bf16 kept), shapes"
        );
        for info in a.entries() {
            assert_eq!(
                a.tensor_data(&info.name).unwrap(),
                b.tensor_data(&info.name).unwrap()
            );
            if info.dtype.is_float() {
                assert_eq!(
                    a.tensor_f32(&info.name, &info.shape).unwrap(),
                    b.tensor_f32(&info.name, &info.shape).unwrap()
                );
            }
        }
        // Converting the converted file again is byte-identical (deterministic layout).
        let again = scratch.0.join(format!("{source}.again.safetensors"));
        convert_to_safetensors(&output, &again).unwrap();
        assert_eq!(
            std::fs::read(&output).unwrap(),
            std::fs::read(&again).unwrap()
        );
    }
    // No temp files left behind by the atomic writer.
    for entry in std::fs::read_dir(&scratch.0).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "leftover {name}");
    }
}

// ------------------------------------------------------------------ safetensors by hand
/// A safetensors file from a literal header and data (no use of our writer).
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn safetensors_f32_f16_bf16_load_right() {
    let scratch = Scratch::new("st-dtypes");
    let f32s = [1.5f32, -2.0, 0.1, 3.0e-5, 65504.0, -0.0];
    let mut data: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    // f16: 1.0 = 0x3c00, -2.5 = 0xc100, 65504 = 0x7bff, 2^-24 (smallest subnormal) = 0x0001.
    for bits in [0x3c00u16, 0xc100, 0x7bff, 0x0001] {
        data.extend_from_slice(&bits.to_le_bytes());
    }
    // bf16: 1.0 = 0x3f80, -3.0 = 0xc040.
    for bits in [0x3f80u16, 0xc040] {
        data.extend_from_slice(&bits.to_le_bytes());
    }
    let header = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F16","shape":[4],"data_offsets":[24,32]},"c":{"dtype":"BF16","shape":[1,2],"data_offsets":[32,36]},"__metadata__":{"recipe":"x"}}"#;
    let path = scratch.file("hand.bin", &safetensors_bytes(header, &data));
    let file = WeightFile::open(&path).unwrap();
    assert_eq!(file.format(), Format::Safetensors);
    assert_eq!(file.metadata(), &[("recipe".to_string(), "x".to_string())]);
    let names: Vec<&str> = file.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(file.tensor_f32("a", &[2, 3]).unwrap(), f32s);
    assert_eq!(
        file.tensor_f32("b", &[4]).unwrap(),
        vec![1.0, -2.5, 65504.0, 2f32.powi(-24)]
    );
    assert_eq!(file.tensor_f32("c", &[1, 2]).unwrap(), vec![1.0, -3.0]);
}

#[test]
fn odd_entry_names_are_kept_as_they_are() {
    let scratch = Scratch::new("st-names");
    let header = r#"{"a\nb \u00e9":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let path = scratch.file("names.st", &safetensors_bytes(header, &[0u8; 8]));
    let file = WeightFile::open(&path).unwrap();
    assert_eq!(file.entries()[0].name, "a\nb \u{e9}");
    assert_eq!(
        file.tensor_f32("a\nb \u{e9}", &[2]).unwrap(),
        vec![0.0, 0.0]
    );
    let err = file
        .tensor_f32("a\nb \u{e9}", &[3])
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn safetensors_writer_round_trips_every_dtype() {
    let scratch = Scratch::new("st-writer");
    let path = scratch.0.join("all.safetensors");
    let tensors = vec![
        (
            "u".to_string(),
            TensorData::U8 {
                shape: vec![3],
                data: vec![1, 2, 255],
            },
        ),
        (
            "f".to_string(),
            TensorData::F32 {
                shape: vec![2, 2],
                data: vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE],
            },
        ),
        (
            "d".to_string(),
            TensorData::F64 {
                shape: vec![1],
                data: vec![0.1],
            },
        ),
        (
            "h".to_string(),
            TensorData::F16 {
                shape: vec![2],
                data: vec![half::f16::from_f32(0.5), half::f16::MAX],
            },
        ),
        (
            "b".to_string(),
            TensorData::BF16 {
                shape: vec![],
                data: vec![half::bf16::from_f32(-7.0)],
            },
        ),
        (
            "l".to_string(),
            TensorData::I64 {
                shape: vec![2],
                data: vec![i64::MIN, 5],
            },
        ),
        (
            "i".to_string(),
            TensorData::I32 {
                shape: vec![1, 1],
                data: vec![-9],
            },
        ),
        (
            "s".to_string(),
            TensorData::I16 {
                shape: vec![1],
                data: vec![-300],
            },
        ),
        (
            "c".to_string(),
            TensorData::I8 {
                shape: vec![1],
                data: vec![-3],
            },
        ),
        (
            "q".to_string(),
            TensorData::Bool {
                shape: vec![3],
                data: vec![true, false, true],
            },
        ),
        (
            "z".to_string(),
            TensorData::F32 {
                shape: vec![0, 4],
                data: vec![],
            },
        ),
    ];
    let meta = vec![("k".to_string(), "v".to_string())];
    write_safetensors(&path, &tensors, &meta).unwrap();
    let file = WeightFile::open(&path).unwrap();
    assert_eq!(file.metadata(), meta.as_slice());
    assert_eq!(file.entries().len(), tensors.len());
    for (name, data) in &tensors {
        assert_eq!(&file.tensor_data(name).unwrap(), data, "{name}");
    }
    assert_eq!(file.tensor_f32("d", &[1]).unwrap(), vec![0.1f64 as f32]);
    // The data section is aligned: every entry starts at a multiple of its element size.
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    for (name, data) in &tensors {
        let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
        assert_eq!(start % data.dtype().size(), 0, "{name}");
    }
    // Bad inputs are refused, and the target is left alone.
    let dup = vec![tensors[0].clone(), tensors[0].clone()];
    assert!(write_safetensors(&path, &dup, &[])
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
    let bad = vec![(
        "x".to_string(),
        TensorData::F32 {
            shape: vec![3],
            data: vec![1.0],
        },
    )];
    assert!(write_safetensors(&path, &bad, &[])
        .unwrap_err()
        .to_string()
        .contains("1 values but shape [3]"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn safetensors_corruptions_are_one_line_errors() {
    let scratch = Scratch::new("st-bad");
    let good_header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let good = safetensors_bytes(good_header, &[0u8; 8]);
    WeightFile::open(&scratch.file("good.st", &good)).unwrap();
    let mut huge_len = good.clone();
    huge_len[..8].copy_from_slice(&(good_header.len() as u64 + 1000).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated_header.st",
            good[..30].to_vec(),
            "exceeds the file size",
        ),
        ("header_too_long.st", huge_len, "exceeds the file size"),
        (
            "truncated_data.st",
            good[..good.len() - 3].to_vec(),
            "reach past",
        ),
        (
            "bogus_json.st",
            safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[2],"#, &[0u8; 8]),
            "not a JSON object",
        ),
        (
            "offsets_out_of_range.st",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
                &[0u8; 8],
            ),
            "entry `w`",
        ),
        (
            "overflowing_offsets.st",
            safetensors_bytes(
                r#"{"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#,
                &[0u8; 8],
            ),
            "reach past",
        ),
        (
            "overlap.st",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0u8; 8],
            ),
            "overlap",
        ),
        (
            "size_mismatch.st",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            ),
            "do not hold 12 bytes",
        ),
        (
            "unknown_dtype.st",
            safetensors_bytes(
                r#"{"w":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            ),
            "unsupported dtype `F8_E4M3`",
        ),
        (
            "hole.st",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0u8; 8],
            ),
            "cover 4 bytes",
        ),
        ("empty.st", Vec::new(), "file is empty"),
        (
            "newline_name.st",
            safetensors_bytes(
                r#"{"a\nb":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            ),
            "entry `a\\nb`",
        ),
    ];
    for (name, bytes, needle) in cases {
        let path = scratch.file(name, &bytes);
        let err = open_err(&path);
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

// ------------------------------------------------------------------ hand-built torch zips
fn zip_bytes(records: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in records {
        w.start_file(
            *name,
            SimpleFileOptions::default().compression_method(method),
        )
        .unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `_rebuild_tensor_v2(('storage', torch.<ty>, key, 'cpu', numel), offset, size, stride, False, OrderedDict())`.
fn tensor_pickle(
    ty: &str,
    key: &str,
    numel: u8,
    offset: u8,
    size: &[i32],
    stride: &[i32],
) -> Vec<u8> {
    let mut p = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
    p.extend(unicode("storage"));
    p.extend_from_slice(format!("ctorch\n{ty}\n").as_bytes());
    p.extend(unicode(key));
    p.extend(unicode("cpu"));
    p.extend_from_slice(&[b'K', numel, b't', b'Q', b'K', offset]);
    for seq in [size, stride] {
        p.push(b'(');
        for &d in seq {
            p.push(b'J');
            p.extend_from_slice(&d.to_le_bytes());
        }
        p.push(b't');
    }
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
    p
}

#[test]
fn big_endian_deflated_wrapped_and_parameter_checkpoints() {
    let scratch = Scratch::new("zip-variants");
    let values = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let be: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
    // {"epoch": 3, "state_dict": {"w": Parameter(t[1:].view(5))}}, big-endian storage, deflated.
    let mut p = b"\x80\x02}(".to_vec();
    p.extend(unicode("epoch"));
    p.extend_from_slice(b"K\x03");
    p.extend(unicode("state_dict"));
    p.extend_from_slice(b"}");
    p.extend(unicode("w"));
    p.extend_from_slice(b"ctorch._utils\n_rebuild_parameter\n(");
    p.extend(tensor_pickle("FloatStorage", "0", 6, 1, &[5], &[1]));
    p.extend_from_slice(b"\x88)tRsu.");
    let bytes = zip_bytes(
        &[
            ("ck/data.pkl", &p),
            ("ck/byteorder", b"big"),
            ("ck/data/0", &be),
        ],
        true,
    );
    let file = WeightFile::open(&scratch.file("wrapped.pt", &bytes)).unwrap();
    assert_eq!(file.entries().len(), 1);
    assert_eq!(file.tensor_f32("w", &[5]).unwrap(), values[1..]);
}

#[test]
fn torch_zip_structural_errors() {
    let scratch = Scratch::new("zip-errors");
    let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let dict = |body: Vec<u8>| {
        let mut p = b"\x80\x02ccollections\nOrderedDict\n)R".to_vec();
        p.extend(unicode("w"));
        p.extend(body);
        p.extend_from_slice(b"s.");
        p
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "short_storage.pt",
            zip_bytes(
                &[
                    (
                        "a/data.pkl",
                        &dict(tensor_pickle("FloatStorage", "0", 8, 0, &[8], &[1])),
                    ),
                    ("a/data/0", &floats),
                ],
                false,
            ),
            "holds 24 bytes but the checkpoint declares 8 F32 elements",
        ),
        (
            "strided_past_end.pt",
            zip_bytes(
                &[
                    (
                        "a/data.pkl",
                        &dict(tensor_pickle("FloatStorage", "0", 6, 1, &[2, 3], &[3, 1])),
                    ),
                    ("a/data/0", &floats),
                ],
                false,
            ),
            "reaches element 6 of a storage holding 6 elements",
        ),
        (
            "no_pickle.pt",
            zip_bytes(&[("a/data/0", &floats)], false),
            "no `<name>/data.pkl` record",
        ),
        (
            "not_a_tensor.pt",
            zip_bytes(&[("a/data.pkl", &dict(b"K\x05".to_vec()))], false),
            "entry `w` is an integer, not a tensor",
        ),
        (
            "bad_byteorder.pt",
            zip_bytes(
                &[("a/data.pkl", b"\x80\x02}."), ("a/byteorder", b"middle")],
                false,
            ),
            "unknown byte order `middle`",
        ),
        (
            "unknown_opcode.pt",
            zip_bytes(&[("a/data.pkl", b"\x80\x02}\x81.")], false),
            "opcode 0x81 at byte 3",
        ),
    ];
    for (name, bytes, needle) in cases {
        let err = open_err(&scratch.file(name, &bytes));
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
    }
}

#[test]
fn convert_refuses_to_blow_up_a_tiny_file() {
    let scratch = Scratch::new("zip-expand");
    // One float broadcast to 2^30 elements (4 GiB as f32): fine to open, not to convert.
    let mut p = b"\x80\x02}".to_vec();
    p.extend(unicode("w"));
    p.extend(tensor_pickle(
        "FloatStorage",
        "0",
        1,
        0,
        &[1 << 20, 1 << 10],
        &[0, 0],
    ));
    p.extend_from_slice(b"s.");
    let bytes = zip_bytes(
        &[("a/data.pkl", &p), ("a/data/0", &2.5f32.to_le_bytes())],
        false,
    );
    let input = scratch.file("expand.pt", &bytes);
    let file = WeightFile::open(&input).unwrap();
    assert_eq!(file.entries()[0].shape, vec![1 << 20, 1 << 10]);
    let output = scratch.0.join("out.safetensors");
    let err = convert_to_safetensors(&input, &output)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the limit"), "{err}");
    assert!(!output.exists());
    // Negative sizes or strides (impossible in torch) are refused at open.
    let mut p = b"\x80\x02}".to_vec();
    p.extend(unicode("w"));
    p.extend(tensor_pickle("FloatStorage", "0", 1, 0, &[1], &[-1]));
    p.extend_from_slice(b"s.");
    let bytes = zip_bytes(
        &[("a/data.pkl", &p), ("a/data/0", &2.5f32.to_le_bytes())],
        false,
    );
    let err = open_err(&scratch.file("negative.pt", &bytes));
    assert!(err.contains("tensor stride is negative"), "{err}");
}

// ------------------------------------------------------------------ robustness
/// Opens and, if that works, reads every entry; any outcome but a panic is fine.
fn exercise(path: &Path) -> bool {
    match WeightFile::open(path) {
        Ok(file) => {
            for info in file.entries() {
                let _ = file.tensor_data(&info.name);
                let _ = file.tensor_f32(&info.name, &info.shape);
            }
            true
        }
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "{e}");
            false
        }
    }
}

#[test]
fn damaged_checkpoints_never_panic() {
    let scratch = Scratch::new("damage");
    let original = std::fs::read(fixture("small_state_dict.pt")).unwrap();
    let path = scratch.0.join("damaged.pt");
    let mut rng = SplitMix64::new(7);
    // Every truncation point near the ends (central directory, first headers), sampled between.
    let n = original.len();
    let cuts = (0..n).filter(|&c| c < 400 || c + 400 > n || c % 13 == 0);
    for cut in cuts {
        std::fs::write(&path, &original[..cut]).unwrap();
        assert!(!exercise(&path), "truncated at {cut} of {n} still opened");
    }
    for round in 0..1500 {
        let mut bytes = original.clone();
        for _ in 0..1 + round % 4 {
            let i = rng.below(n);
            bytes[i] ^= 1 << rng.below(8);
        }
        std::fs::write(&path, &bytes).unwrap();
        exercise(&path);
    }
}

/// The CRC catches flips inside data.pkl, so damage the pickle itself and re-zip it.
#[test]
fn damaged_pickles_never_panic() {
    let scratch = Scratch::new("pickle-damage");
    let original = std::fs::read(fixture("small_state_dict.pt")).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&original)).unwrap();
    let mut records = Vec::new();
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut data).unwrap();
        records.push((f.name().to_string(), data));
    }
    let pkl = records
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .unwrap();
    let path = scratch.0.join("damaged.pt");
    let mut rng = SplitMix64::new(11);
    let mut opened = 0;
    for round in 0..1500 {
        let mut edited = records.clone();
        let data = &mut edited[pkl].1;
        match round % 3 {
            0 => {
                let i = rng.below(data.len());
                data[i] = rng.next_u64() as u8;
            }
            1 => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            _ => {
                let (a, b) = (rng.below(data.len()), rng.below(data.len()));
                data.swap(a, b);
            }
        }
        let refs: Vec<(&str, &[u8])> = edited
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        std::fs::write(&path, zip_bytes(&refs, false)).unwrap();
        if exercise(&path) {
            opened += 1;
        }
    }
    // Some single-byte edits are harmless (a value inside a name or a float); most are not.
    assert!(opened > 0 && opened < 1500, "opened {opened}");
}

/// A view reads only the part of its storage it reaches, yet the record's CRC is still checked
/// (on the first read of each storage), even where the damage lies outside the view.
#[test]
fn partial_storage_reads_still_check_the_crc() {
    let scratch = Scratch::new("zip-crc");
    let floats: Vec<u8> = (0..1000).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let mut p = b"\x80\x02}".to_vec();
    p.extend(unicode("w"));
    p.extend(tensor_pickle("FloatStorage", "0", 250, 1, &[2], &[1]));
    p.extend_from_slice(b"s.");
    // Stored (not deflated): the storage bytes appear as they are in the archive.
    let mut bytes = zip_bytes(&[("a/data.pkl", &p), ("a/data/0", &floats)], false);
    let good = WeightFile::open(&scratch.file("good.pt", &bytes)).unwrap();
    assert_eq!(good.tensor_f32("w", &[2]).unwrap(), [1.0, 2.0]);
    let at = bytes
        .windows(4)
        .position(|w| w == 999f32.to_le_bytes())
        .unwrap();
    bytes[at] ^= 1;
    let bad = WeightFile::open(&scratch.file("bad.pt", &bytes)).unwrap();
    let err = bad.tensor_f32("w", &[2]).unwrap_err().to_string();
    assert!(err.contains("cannot read record `a/data/0`"), "{err}");
    assert!(err.to_lowercase().contains("checksum"), "{err}");
}

/// Regression (unbounded allocation): a one-element view on a storage that inflates to
/// 256 MiB used to read the whole record into memory; now it keeps 4 bytes and streams the
/// rest through the CRC check once.
#[test]
fn a_tiny_view_on_a_huge_deflated_storage_reads_only_its_bytes() {
    let scratch = Scratch::new("zip-huge-storage");
    let numel = 64usize << 20;
    let zeros = vec![0u8; numel * 4];
    let mut p = b"\x80\x02}".to_vec();
    p.extend(unicode("w"));
    let mut t = tensor_pickle("FloatStorage", "0", 0, 0, &[1], &[1]);
    // Patch the storage size (a K opcode holding 0) to `numel` as a BININT.
    let k = t.windows(3).position(|w| w == b"K\x00t").unwrap();
    t.splice(
        k..k + 2,
        [b'J'].into_iter().chain((numel as i32).to_le_bytes()),
    );
    p.extend(t);
    p.extend_from_slice(b"s.");
    let bytes = zip_bytes(&[("a/data.pkl", &p), ("a/data/0", &zeros)], true);
    drop(zeros);
    assert!(bytes.len() < 1 << 20, "{}", bytes.len());
    let file = WeightFile::open(&scratch.file("huge.pt", &bytes)).unwrap();
    for _ in 0..3 {
        assert_eq!(file.tensor_f32("w", &[1]).unwrap(), [0.0]);
    }
}

/// The pickle record of a `.ckpt` is read whole, so its size is bounded (256 MiB), from the
/// archive's header, before it is read.
#[test]
fn an_oversized_pickle_record_is_refused() {
    use zip::write::SimpleFileOptions;
    let scratch = Scratch::new("zip-big-pickle");
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file(
        "a/data.pkl",
        SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true),
    )
    .unwrap();
    let chunk = vec![b'N'; 1 << 20];
    for _ in 0..256 {
        w.write_all(&chunk).unwrap();
    }
    w.write_all(b".").unwrap();
    let bytes = w.finish().unwrap().into_inner();
    let err = open_err(&scratch.file("big.pt", &bytes));
    assert!(
        err.contains("record `a/data.pkl` is 268435457 bytes, more than the 268435456 expected"),
        "{err}"
    );
}
