//! The conformance fixtures of `tools/reference/make_fixtures.py` (see its README): sampled
//! NCHW values of the query-side taps from PyTorch in float64 (the truth) and float32.

use std::path::PathBuf;

use metauas::io::image::decode_image_file;
use metauas::synth::{synthetic_image, WeightRecipe};
use safetensors::SafeTensors;
use serde_json::Value;

/// `tests/fixtures` of this checkout, or `$METAUAS_FIXTURES` (the GPU kit runs the test
/// binary on a machine where the build's path does not exist).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("METAUAS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

pub struct Fixture {
    pub meta: std::collections::HashMap<String, String>,
    pub bytes: Vec<u8>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = fixtures_dir().join("conformance").join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = meta.metadata().clone().expect("fixture metadata");
        Fixture { meta, bytes }
    }

    pub fn json(&self, key: &str) -> Value {
        serde_json::from_str(&self.meta[key]).unwrap_or_else(|e| panic!("metadata {key}: {e}"))
    }

    pub fn recipe(&self) -> WeightRecipe {
        let r = self.json("recipe");
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("recipe.{k}"));
        WeightRecipe {
            seed: r["seed"].as_u64().expect("recipe.seed"),
            gain_encoder: f("gain_encoder"),
            gain_alignment: f("gain_alignment"),
            gain_decoder: f("gain_decoder"),
            gain_head: f("gain_head"),
        }
    }

    /// Whether the fixture holds `tap` (the JPEG cases keep only some taps).
    pub fn has_tap(&self, tap: &str) -> bool {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture");
        st.tensor(&format!("{tap}.truth")).is_ok()
    }

    /// (indices into the NCHW tensor, float64 truth, PyTorch float32) of one tap.
    pub fn tap(&self, tap: &str) -> (Vec<i64>, Vec<f64>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture");
        let get = |suffix: &str| {
            st.tensor(&format!("{tap}.{suffix}"))
                .expect(tap)
                .data()
                .to_vec()
        };
        let idx = get("idx")
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let truth = get("truth")
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let t32 = get("torch32")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (idx, truth, t32)
    }
}

/// A file of the image corpus (`{"file": ...}`, decoded as any query is), or a synthetic
/// image from its recipe.
pub fn image_from_meta(v: &Value) -> metauas::io::image::RgbImage8 {
    if let Some(file) = v["file"].as_str() {
        let path = fixtures_dir().join("images").join(file);
        return decode_image_file(&path).unwrap_or_else(|e| panic!("{e}"));
    }
    let u = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("image.{k}")) as usize;
    let defect = v["defect"].as_array().map(|d| {
        let d: Vec<usize> = d.iter().map(|x| x.as_u64().unwrap() as usize).collect();
        (d[0], d[1], d[2])
    });
    synthetic_image(u("seed") as u64, u("width"), u("height"), defect)
}

/// The taps a fixture samples, in graph order.
pub const FIXTURE_TAPS: [&str; 14] = [
    "f1", "f2", "f3", "f4", "f5", "fused5", "fused4", "fused3", "dec0", "dec1", "dec2", "dec3",
    "dec4", "map",
];

/// The bundle name (`model::taps`) of a fixture's tap.
pub fn bundle_name(tap: &str) -> String {
    let blocks = ["5", "9", "21", "31"];
    match tap {
        "f1" => "query.encoder._swish".into(),
        "map" => "map".into(),
        _ if tap.starts_with("fused") => {
            let n: usize = tap[5..].parse().unwrap();
            format!("alignment.{}", 5 - n)
        }
        _ if tap.starts_with("dec") => format!("decoder.blocks.{}", &tap[3..]),
        _ => {
            let n: usize = tap[1..].parse().unwrap();
            format!("query.encoder._blocks.{}", blocks[n - 2])
        }
    }
}
