//! The fuzz targets' generated seed files (`fuzz/seeds/`): made here, by the crate's own
//! writers, so they stay in step with the formats.
//!
//! `METAUAS_WRITE_FUZZ_SEEDS=1 cargo test --release --test fuzz_seeds` (re)writes them; a plain
//! run checks that every committed seed still opens the way it was meant to (a seed that no
//! longer parses would leave its target fuzzing only the first error path).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use metauas::io::image::decode_image_file;
use metauas::io::weights::{write_safetensors, TensorData, WeightFile, WeightLimits};
use metauas::model::{BankEntry, Engine, PromptBank};
use metauas::synth::{synthetic_image, synthetic_weights};

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

fn tiny_safetensors(dir: &Path) {
    let tensors = vec![
        (
            "a.weight".to_string(),
            TensorData::F32 {
                shape: vec![2, 3],
                data: vec![1.0, -2.0, 0.5, 0.0, 3.25, -0.125],
            },
        ),
        (
            "b.half".to_string(),
            TensorData::F16 {
                shape: vec![4],
                data: [1.0f32, 2.0, -1.5, 0.0]
                    .iter()
                    .map(|&v| half::f16::from_f32(v))
                    .collect(),
            },
        ),
        (
            "c.bf16".to_string(),
            TensorData::BF16 {
                shape: vec![1, 2],
                data: vec![half::bf16::from_f32(0.5), half::bf16::from_f32(-4.0)],
            },
        ),
        (
            "d.num_batches_tracked".to_string(),
            TensorData::I64 {
                shape: vec![],
                data: vec![7],
            },
        ),
    ];
    let meta = vec![("note".to_string(), "fuzz seed".to_string())];
    write_safetensors(&dir.join("tiny.safetensors"), &tensors, &meta).unwrap();
    write_safetensors(&dir.join("empty.safetensors"), &[], &[]).unwrap();
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `{"w": Parameter(tensor(storage "0", offset 1, size [2, 2], stride [1, 2]))}` with a
/// big-endian storage, deflated: the smallest file that reaches every stage of the reader.
fn tiny_ckpt(dir: &Path) {
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)R".to_vec();
    p.extend(unicode("w"));
    p.extend_from_slice(
        b"ctorch._utils\n_rebuild_parameter\n(ctorch._utils\n_rebuild_tensor_v2\n((",
    );
    p.extend(unicode("storage"));
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    p.extend(unicode("0"));
    p.extend(unicode("cpu"));
    p.extend_from_slice(b"K\x06tQK\x01(K\x02K\x02t(K\x01K\x02t\x89h\x00)RtR\x88)tRs.");
    let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_be_bytes()).collect();
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in [
        ("tiny/data.pkl", p.as_slice()),
        ("tiny/byteorder", b"big".as_slice()),
        ("tiny/data/0", data.as_slice()),
    ] {
        w.start_file(name, opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    let bytes = w.finish().unwrap().into_inner();
    std::fs::write(dir.join("tiny.ckpt"), bytes).unwrap();
}

/// A bank of two prompts at size 32 from synthetic weights.
fn tiny_bank(dir: &Path) {
    let engine = Engine::new(&synthetic_weights(&common::default_recipe(1)), 32).unwrap();
    let mut bank = PromptBank::new(&engine);
    for (i, name) in ["good_a", "good_b"].into_iter().enumerate() {
        let img = synthetic_image(i as u64 + 1, 40, 36, None);
        bank.push(BankEntry {
            name: name.to_string(),
            source: format!("{name}.png"),
            features: engine.encode_prompt(&img).unwrap(),
        })
        .unwrap();
    }
    bank.save(&dir.join("tiny.bank")).unwrap();
}

#[test]
fn seeds_are_current() {
    if std::env::var_os("METAUAS_WRITE_FUZZ_SEEDS").is_some() {
        for target in ["safetensors", "ckpt", "bank"] {
            std::fs::create_dir_all(seeds_dir(target)).unwrap();
        }
        tiny_safetensors(&seeds_dir("safetensors"));
        tiny_ckpt(&seeds_dir("ckpt"));
        tiny_bank(&seeds_dir("bank"));
    }
    let limits = WeightLimits::default();
    let open = |target: &str, name: &str| {
        let path = seeds_dir(target).join(name);
        WeightFile::open_with(&path, &limits).unwrap_or_else(|e| panic!("seed {name}: {e}"))
    };
    let st = open("safetensors", "tiny.safetensors");
    assert_eq!(st.entries().len(), 4);
    assert_eq!(
        st.tensor_f32("a.weight", &[2, 3]).unwrap(),
        [1.0, -2.0, 0.5, 0.0, 3.25, -0.125]
    );
    assert!(open("safetensors", "empty.safetensors")
        .entries()
        .is_empty());
    let ck = open("ckpt", "tiny.ckpt");
    assert_eq!(ck.tensor_f32("w", &[2, 2]).unwrap(), [1.0, 3.0, 2.0, 4.0]);
    let bank = PromptBank::from_weight_file(&open("bank", "tiny.bank")).unwrap();
    assert_eq!((bank.len(), bank.size()), (2, 32));
    // Every committed seed of every target is a valid input of its kind.
    for entry in std::fs::read_dir(seeds_dir("ckpt")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // The hostile and broken fixtures are meant to be refused.
        let ok = WeightFile::open_with(&path, &limits).is_ok();
        let hostile = ["evil_", "truncated", "not_a_zip", "view_out", "missing_"]
            .iter()
            .any(|p| name.starts_with(p));
        assert_eq!(ok, !hostile, "ckpt seed {name}");
    }
    for entry in std::fs::read_dir(seeds_dir("image")).unwrap() {
        let path = entry.unwrap().path();
        decode_image_file(&path).unwrap_or_else(|e| panic!("image seed: {e}"));
    }
}
