//! Deterministic synthetic weights and images, following `docs/SYNTHETIC.md` to the bit.
//! The PyTorch reference (`tools/reference`) implements the same document; the conformance
//! fixtures depend on both sides producing identical values, so any change here must be
//! made there too.

use std::collections::HashSet;

use rayon::prelude::*;

use crate::io::image::RgbImage8;
use crate::model::MemorySource;
pub use crate::util::rng::{fnv1a64, SplitMix64};

pub mod mvtec;

/// The checkpoint's entries: `name \t (shape) \t dtype`, one a line.
const STATE_DICT_TSV: &str = include_str!("../../weights/metauas_state_dict.tsv");

/// `((r >> 40) + 0.5) / 2^24`: in (0, 1), exact in float64.
fn unit(r: u64) -> f64 {
    ((r >> 40) as f64 + 0.5) / 16_777_216.0
}

/// `2 * unit(r) - 1`: in (-1, 1).
fn sym(r: u64) -> f64 {
    2.0 * unit(r) - 1.0
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightRecipe {
    pub seed: u64,
    pub gain_encoder: f64,
    pub gain_alignment: f64,
    pub gain_decoder: f64,
    pub gain_head: f64,
}

impl WeightRecipe {
    /// Unit gains: the recipe `metauas bench` and `metauas synth-weights` use.
    pub fn unit(seed: u64) -> WeightRecipe {
        WeightRecipe {
            seed,
            gain_encoder: 1.0,
            gain_alignment: 1.0,
            gain_decoder: 1.0,
            gain_head: 1.0,
        }
    }
}

/// All entries of the official state dict: name, shape, dtype string (`float32`, `int64`).
pub fn official_entries() -> Vec<(String, Vec<usize>, String)> {
    STATE_DICT_TSV
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.split('\t');
            let (name, shape, dtype) = match (fields.next(), fields.next(), fields.next()) {
                (Some(n), Some(s), Some(d)) => (n, s, d),
                _ => panic!("weights/metauas_state_dict.tsv: malformed line {line:?}"),
            };
            (
                name.to_string(),
                parse_shape(shape),
                dtype.trim().to_string(),
            )
        })
        .collect()
}

/// `(48, 3, 3, 3)`, `(48,)` or `()`.
fn parse_shape(text: &str) -> Vec<usize> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("weights/metauas_state_dict.tsv: bad shape {text:?}"));
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("weights/metauas_state_dict.tsv: bad shape {text:?}"))
        })
        .collect()
}

pub enum SynthTensor {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// What an entry is, which decides its value formula (the table in `docs/SYNTHETIC.md`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    BnVar,
    BnMean,
    BnWeight,
    BnBias,
    /// `sym * gain * sqrt(3 / fan_in)`: the two factors after `sym`.
    ConvWeight {
        gain: f64,
        fan_in: usize,
    },
    ConvBias,
}

fn kind_of(
    name: &str,
    shape: &[usize],
    bn_prefixes: &HashSet<&str>,
    recipe: &WeightRecipe,
) -> Kind {
    let parent = name.rsplit_once('.').map_or("", |(p, _)| p);
    if name.ends_with("num_batches_tracked") {
        Kind::Counter
    } else if name.ends_with(".running_var") {
        Kind::BnVar
    } else if name.ends_with(".running_mean") {
        Kind::BnMean
    } else if name.ends_with(".weight") && bn_prefixes.contains(parent) {
        Kind::BnWeight
    } else if name.ends_with(".bias") && bn_prefixes.contains(parent) {
        Kind::BnBias
    } else if name.ends_with(".weight") {
        Kind::ConvWeight {
            gain: gain_for(name, recipe),
            fan_in: shape.iter().skip(1).product(),
        }
    } else if name.ends_with(".bias") {
        Kind::ConvBias
    } else {
        panic!("synthetic weights: no rule for entry {name}")
    }
}

fn gain_for(name: &str, recipe: &WeightRecipe) -> f64 {
    match name.split('.').next() {
        Some("encoder") => recipe.gain_encoder,
        Some("alignment") => recipe.gain_alignment,
        Some("decoder") => recipe.gain_decoder,
        Some("mask_head") => recipe.gain_head,
        _ => panic!("synthetic weights: no gain for entry {name}"),
    }
}

/// Value of one element from its draw, in float64 (left-to-right as in the spec).
fn value(kind: Kind, r: u64) -> f64 {
    match kind {
        Kind::Counter => 0.0,
        Kind::BnVar => 1.0 + 0.5 * sym(r),
        Kind::BnMean | Kind::BnBias | Kind::ConvBias => 0.1 * sym(r),
        Kind::BnWeight => 1.0 + 0.25 * sym(r),
        Kind::ConvWeight { gain, fan_in } => sym(r) * gain * (3.0 / fan_in as f64).sqrt(),
    }
}

/// Synthetic values for every official entry: counters are int64 zeros (shape `()`), the
/// rest float32, each rounded once from its float64 value.
pub fn synthetic_state_dict(recipe: &WeightRecipe) -> Vec<(String, Vec<usize>, SynthTensor)> {
    let entries = official_entries();
    let bn_prefixes: HashSet<&str> = entries
        .iter()
        .filter_map(|(name, _, _)| name.strip_suffix(".running_mean"))
        .collect();
    entries
        .par_iter()
        .map(|(name, shape, _)| {
            let kind = kind_of(name, shape, &bn_prefixes, recipe);
            let numel: usize = shape.iter().product();
            let tensor = if kind == Kind::Counter {
                SynthTensor::I64(vec![0; numel])
            } else {
                let stream = SplitMix64::new(fnv1a64(format!("{}:{name}", recipe.seed).as_bytes()));
                SynthTensor::F32(
                    (1..=numel as u64)
                        .map(|i| value(kind, stream.draw_at(i)) as f32)
                        .collect(),
                )
            };
            (name.clone(), shape.clone(), tensor)
        })
        .collect()
}

/// The synthetic 8-bit RGB test image `image(seed, width, height, defect)` of the spec:
/// a smooth pattern plus noise, with the optional square `defect = (x0, y0, side)` inverted.
pub fn synthetic_image(
    seed: u64,
    width: usize,
    height: usize,
    defect: Option<(usize, usize, usize)>,
) -> RgbImage8 {
    let mut stream = SplitMix64::new(fnv1a64(format!("image:{seed}").as_bytes()));
    let inside = |x: usize, y: usize| {
        defect.is_some_and(|(x0, y0, side)| x >= x0 && x < x0 + side && y >= y0 && y < y0 + side)
    };
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height as u64 {
        for x in 0..width as u64 {
            for c in 0..3u64 {
                let r = stream.next_u64();
                let smooth = (x * (3 + c) + y * (5 - c) + (x * y) / 16) % 512;
                let tri = if smooth < 256 { smooth } else { 511 - smooth };
                let v = ((tri * 3 + (r >> 56)) / 4) as u8;
                data.push(if inside(x as usize, y as usize) {
                    255 - v
                } else {
                    v
                });
            }
        }
    }
    RgbImage8 {
        width,
        height,
        data,
    }
}

/// A synthetic camera frame: a smooth picture with fine texture, as a 5-megapixel camera
/// sees a part (benchmarks of decoding, pre-processing and frame-size outputs). Fine
/// texture keeps the JPEG and PNG as costly to decode as a real photo's.
pub fn camera_frame(width: usize, height: usize) -> RgbImage8 {
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height as u32 {
        for x in 0..width as u32 {
            let (fx, fy) = (x as f32, y as f32);
            let texture =
                (((x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 13) % 9) as u8;
            data.extend_from_slice(&[
                (60.0 + 120.0 * fx / width as f32) as u8 + texture,
                (80.0 + 100.0 * fy / height as f32) as u8 + texture,
                (128.0 + 60.0 * (fx / 150.0).sin() * (fy / 110.0).cos()) as u8,
            ]);
        }
    }
    RgbImage8 {
        width,
        height,
        data,
    }
}

/// A policy whose image and pixel thresholds are `map`'s 99.5th percentile, so a synthetic
/// frame ends with a handful of regions, as a real defect does (benchmarks of the verdict).
pub fn top_half_percent_policy(map: &[f32]) -> crate::model::decision::Policy {
    use crate::model::decision::{Policy, Threshold};
    let mut sorted = map.to_vec();
    sorted.sort_by(f32::total_cmp);
    let level = Threshold::given(f64::from(sorted[sorted.len() * 995 / 1000]));
    Policy {
        image: Some(level),
        pixel: Some(level),
        ..Policy::default()
    }
}

/// Writes the synthetic state dict of `recipe` (every official entry, counters as int64) as
/// safetensors, with `metadata`: weights for tests, benchmarks and trying the tool.
pub fn write_synthetic_safetensors(
    path: &std::path::Path,
    recipe: &WeightRecipe,
    metadata: &[(String, String)],
) -> crate::Result<()> {
    write_state_dict(path, synthetic_state_dict(recipe), metadata)
}

/// Writes a (possibly edited) state dict in the form `synthetic_state_dict` returns.
pub fn write_state_dict(
    path: &std::path::Path,
    dict: Vec<(String, Vec<usize>, SynthTensor)>,
    metadata: &[(String, String)],
) -> crate::Result<()> {
    use crate::io::weights::{write_safetensors, TensorData};
    let tensors: Vec<(String, TensorData)> = dict
        .into_iter()
        .map(|(name, shape, t)| {
            let data = match t {
                SynthTensor::F32(data) => TensorData::F32 { shape, data },
                SynthTensor::I64(data) => TensorData::I64 { shape, data },
            };
            (name, data)
        })
        .collect();
    write_safetensors(path, &tensors, metadata)
}

/// Every float entry of the official state dict, filled by `recipe`, as a tensor source
/// (an engine's weights without a file).
pub fn synthetic_weights(recipe: &WeightRecipe) -> MemorySource {
    let mut src = MemorySource::default();
    for (name, shape, t) in synthetic_state_dict(recipe) {
        if let SynthTensor::F32(data) = t {
            src.insert(&name, shape, data);
        }
    }
    src
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::{mix, GAMMA};

    fn recipe() -> WeightRecipe {
        WeightRecipe {
            seed: 7,
            gain_encoder: 1.0,
            gain_alignment: 2.5,
            gain_decoder: 0.75,
            gain_head: 1.5,
        }
    }

    #[test]
    fn fnv1a64_known_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn unit_and_sym_stay_inside_open_intervals() {
        assert_eq!(unit(0), 0.5 / 16_777_216.0);
        assert_eq!(unit(u64::MAX), 1.0 - 0.5 / 16_777_216.0);
        assert!(sym(0) > -1.0 && sym(u64::MAX) < 1.0);
        // Note: the spec calls unit() exact in float32; that holds only below 0.5 (above it
        // the value needs 25 significant bits). Nothing relies on it: values are computed in
        // float64 and rounded once.
        assert_eq!(unit(12345 << 40) as f32 as f64, unit(12345 << 40));
    }

    #[test]
    fn official_entries_match_the_checkpoint_listing() {
        let entries = official_entries();
        assert_eq!(entries.len(), 820);
        let counters = entries.iter().filter(|e| e.2 == "int64").count();
        assert_eq!(counters, 106);
        assert!(entries.iter().all(|(n, s, d)| (d == "int64")
            == n.ends_with("num_batches_tracked")
            && (d != "int64" || s.is_empty())));
        let params: usize = entries
            .iter()
            .filter(|e| e.2 == "float32")
            .map(|e| e.1.iter().product::<usize>())
            .sum();
        // The model spec's parameter count, plus the BN running statistics
        // (not parameters in PyTorch's sense, but checkpoint entries).
        let running: usize = entries
            .iter()
            .filter(|e| e.0.contains(".running_"))
            .map(|e| e.1.iter().product::<usize>())
            .sum();
        assert_eq!(params - running, 22_130_305);
        assert_eq!(entries[0].0, "encoder._conv_stem.weight");
        assert_eq!(entries[0].1, vec![48, 3, 3, 3]);
    }

    #[test]
    fn synthetic_state_dict_follows_the_rules() {
        let r = recipe();
        let dict = synthetic_state_dict(&r);
        let entries = official_entries();
        assert_eq!(dict.len(), entries.len());
        let mut float_values = 0usize;
        for ((name, shape, tensor), (ename, eshape, dtype)) in dict.iter().zip(&entries) {
            assert_eq!((name, shape), (ename, eshape));
            let numel: usize = shape.iter().product();
            match tensor {
                SynthTensor::I64(v) => {
                    assert_eq!(dtype, "int64");
                    assert_eq!(v, &vec![0i64]);
                    assert!(shape.is_empty());
                }
                SynthTensor::F32(v) => {
                    assert_eq!(dtype, "float32");
                    assert_eq!(v.len(), numel);
                    float_values += numel;
                    check_ranges(name, shape, v, &r);
                }
            }
        }
        let expected: usize = entries
            .iter()
            .filter(|e| e.2 == "float32")
            .map(|e| e.1.iter().product::<usize>())
            .sum();
        assert_eq!(float_values, expected);
    }

    fn check_ranges(name: &str, shape: &[usize], v: &[f32], r: &WeightRecipe) {
        let within = |lo: f32, hi: f32| v.iter().all(|&x| x > lo && x < hi);
        if name.ends_with(".running_var") {
            assert!(within(0.5, 1.5), "{name}");
        } else if name.ends_with(".running_mean") {
            assert!(within(-0.1, 0.1), "{name}");
        } else if shape.len() == 4 {
            let gain = match name.split('.').next().unwrap() {
                "encoder" => r.gain_encoder,
                "alignment" => r.gain_alignment,
                "decoder" => r.gain_decoder,
                _ => r.gain_head,
            };
            let bound = gain * (3.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt();
            assert!(v.iter().all(|&x| (x as f64).abs() < bound), "{name}");
            // Not degenerate: the values spread over most of the range.
            let top = v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
            assert!(v.len() < 16 || top > 0.5 * bound, "{name}");
        } else if name.ends_with(".weight") {
            assert!(within(0.75, 1.25), "BN weight {name}");
        } else {
            assert!(within(-0.1, 0.1), "bias {name}");
        }
    }

    #[test]
    fn weight_values_come_from_the_named_stream() {
        // Recompute two entries from the spec's words, independently of `kind_of`.
        let r = recipe();
        let dict = synthetic_state_dict(&r);
        let find = |n: &str| match &dict.iter().find(|e| e.0 == n).unwrap().2 {
            SynthTensor::F32(v) => v.clone(),
            SynthTensor::I64(_) => panic!("{n} is int64"),
        };
        let stem = find("encoder._conv_stem.weight");
        let state0 = fnv1a64(b"7:encoder._conv_stem.weight");
        for i in [0usize, 1, 100, 1295] {
            let raw = mix(state0.wrapping_add((i as u64 + 1).wrapping_mul(GAMMA)));
            let s = 2.0 * (((raw >> 40) as f64 + 0.5) / 16_777_216.0) - 1.0;
            let want = (s * 1.0 * (3.0f64 / 27.0).sqrt()) as f32;
            assert_eq!(stem[i].to_bits(), want.to_bits(), "element {i}");
        }
        let var = find("encoder._bn0.running_var");
        let raw = mix(fnv1a64(b"7:encoder._bn0.running_var").wrapping_add(GAMMA));
        let s = 2.0 * (((raw >> 40) as f64 + 0.5) / 16_777_216.0) - 1.0;
        assert_eq!(var[0], (1.0 + 0.5 * s) as f32);
        // A different seed gives different weights.
        let other = synthetic_state_dict(&WeightRecipe { seed: 8, ..r });
        match &other[0].2 {
            SynthTensor::F32(v) => assert_ne!(v[..8], stem[..8]),
            SynthTensor::I64(_) => unreachable!(),
        }
    }

    #[test]
    fn synthetic_image_is_deterministic_and_defect_inverts() {
        let a = synthetic_image(2, 28, 24, None);
        assert_eq!(a, synthetic_image(2, 28, 24, None));
        assert_eq!((a.width, a.height, a.data.len()), (28, 24, 28 * 24 * 3));
        assert_ne!(a.data, synthetic_image(3, 28, 24, None).data);

        let d = synthetic_image(2, 28, 24, Some((15, 6, 5)));
        for y in 0..24 {
            for x in 0..28 {
                for c in 0..3 {
                    let i = (y * 28 + x) * 3 + c;
                    let inside = (15..20).contains(&x) && (6..11).contains(&y);
                    let want = if inside { 255 - a.data[i] } else { a.data[i] };
                    assert_eq!(d.data[i], want, "({x},{y},{c})");
                }
            }
        }
    }

    #[test]
    fn synthetic_image_first_bytes_follow_the_formula() {
        let img = synthetic_image(1, 300, 220, None);
        let state0 = fnv1a64(b"image:1");
        // Byte at (x=0, y=0, c=0): smooth = 0, v = (r >> 56) / 4.
        assert_eq!(
            img.data[0] as u64,
            (mix(state0.wrapping_add(GAMMA)) >> 56) / 4
        );
        // Byte at (x=10, y=3, c=2) is draw number (3*300 + 10)*3 + 2 + 1.
        let i = (3 * 300 + 10) * 3 + 2;
        let r = mix(state0.wrapping_add((i as u64 + 1).wrapping_mul(GAMMA)));
        let smooth = 10 * 5 + 3 * 3 + 30 / 16; // below 512, no fold
        assert_eq!(img.data[i] as u64, (smooth * 3 + (r >> 56)) / 4);
        // The triangle fold: x=100, y=0, c=2 gives smooth = 500 -> tri = 11.
        let i = 100 * 3 + 2;
        let r = mix(state0.wrapping_add((i as u64 + 1).wrapping_mul(GAMMA)));
        assert_eq!(img.data[i] as u64, (11 * 3 + (r >> 56)) / 4);
    }
}
