//! Prompt banks: normal images encoded once, stored as safetensors, reused by `segment` and
//! `serve` without re-encoding. A bank records the weights' fingerprint and the model size and
//! is refused by an engine with other weights or another size.

use std::path::Path;

use super::decision::{Calibration, RoiMask};
use super::engine::{Engine, PromptFeatures};
use super::graphs::prompt_shapes;
use crate::error::{Error, Result};
use crate::io::weights::{write_safetensors, Format, TensorData, WeightFile};

/// Marks a safetensors file as a bank (metadata key `format`).
const BANK_FORMAT: &str = "metauas-prompt-bank";
const BANK_VERSION: &str = "2";
/// Versions this build reads: 1 had no calibration and no inspection mask.
const READABLE_VERSIONS: [&str; 2] = ["1", "2"];
/// Most prompts a bank may hold: each costs ~1.2 MB at 256 and ~5 MB at 512.
pub const MAX_BANK_PROMPTS: usize = 4096;

/// One encoded normal image.
#[derive(Clone, Debug)]
pub struct BankEntry {
    /// A short name (unique within the bank), by default the image's file stem.
    pub name: String,
    /// Where the image came from (file name as given), for the record.
    pub source: String,
    pub features: PromptFeatures,
}

/// Encoded prompts for one engine (weights + size).
///
/// ```
/// use metauas::model::{BankEntry, PromptBank};
/// use metauas::synth::{synthetic_image, synthetic_weights, WeightRecipe};
/// use metauas::Engine;
///
/// let engine = Engine::new(&synthetic_weights(&WeightRecipe::unit(1)), 64)?;
/// let mut bank = PromptBank::new(&engine);
/// for (name, seed) in [("bottle", 1), ("cable", 7)] {
///     let features = engine.encode_prompt(&synthetic_image(seed, 64, 64, None))?;
///     bank.push(BankEntry { name: name.into(), source: format!("{name}.png"), features })?;
/// }
/// let path = std::env::temp_dir().join(format!("doc-bank-{}.safetensors", std::process::id()));
/// bank.save(&path)?;
/// let loaded = PromptBank::load(&path, &engine)?; // refused for other weights or sizes
/// let cable = &loaded.get("cable").unwrap().features;
/// let map = engine.segment(cable, &synthetic_image(8, 64, 64, Some((10, 10, 6))))?;
/// # std::fs::remove_file(&path).unwrap();
/// # assert_eq!(map.size, 64);
/// # Ok::<(), metauas::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PromptBank {
    size: usize,
    weights_hash: String,
    entries: Vec<BankEntry>,
    roi: Option<RoiMask>,
    calibration: Option<Calibration>,
}

impl PromptBank {
    /// An empty bank for `engine`'s weights and size.
    pub fn new(engine: &Engine) -> PromptBank {
        PromptBank {
            size: engine.size(),
            weights_hash: engine.weights_hash(),
            entries: Vec::new(),
            roi: None,
            calibration: None,
        }
    }

    /// The inspection mask the bank's product is judged through, if any.
    pub fn roi(&self) -> Option<&RoiMask> {
        self.roi.as_ref()
    }

    /// Sets the inspection mask (of this bank's size). A calibration made without it no
    /// longer holds and is dropped.
    pub fn set_roi(&mut self, roi: Option<RoiMask>) -> Result<()> {
        if let Some(r) = &roi {
            if r.side != self.size {
                return Err(Error::new(format!(
                    "the inspection mask is {0}x{0}, the bank holds size {1}",
                    r.side, self.size
                )));
            }
        }
        if roi != self.roi {
            self.calibration = None;
        }
        self.roi = roi;
        Ok(())
    }

    /// The thresholds from `metauas bank calibrate`, if calibrated.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    pub fn set_calibration(&mut self, calibration: Option<Calibration>) {
        self.calibration = calibration;
    }

    pub fn size(&self) -> usize {
        self.size
    }
    pub fn weights_hash(&self) -> &str {
        &self.weights_hash
    }
    pub fn entries(&self) -> &[BankEntry] {
        &self.entries
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn get(&self, name: &str) -> Option<&BankEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Adds an entry; its name must be new and its features of this bank's size.
    pub fn push(&mut self, entry: BankEntry) -> Result<()> {
        if self.get(&entry.name).is_some() {
            return Err(Error::new(format!(
                "prompt name `{}` is already in the bank",
                entry.name
            )));
        }
        if entry.features.size != self.size {
            return Err(Error::new(format!(
                "prompt `{}` was encoded at size {}, the bank holds size {}",
                entry.name, entry.features.size, self.size
            )));
        }
        if self.entries.len() >= MAX_BANK_PROMPTS {
            return Err(Error::new(format!(
                "a bank holds at most {MAX_BANK_PROMPTS} prompts"
            )));
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Writes the bank as safetensors (atomically: a temporary file, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let shapes = prompt_shapes(self.size);
        let mut tensors = Vec::with_capacity(self.entries.len() * shapes.len());
        for (i, e) in self.entries.iter().enumerate() {
            for (t, (data, shape)) in e.features.tensors.iter().zip(shapes).enumerate() {
                tensors.push((
                    format!("prompt.{i}.{t}"),
                    TensorData::F32 {
                        shape: vec![shape.h, shape.w, shape.c],
                        data: data.clone(),
                    },
                ));
            }
        }
        if let Some(roi) = &self.roi {
            let inside = roi.inside.iter().map(|&v| f32::from(v)).collect();
            tensors.push((
                "roi".to_string(),
                TensorData::F32 {
                    shape: vec![self.size, self.size],
                    data: inside,
                },
            ));
        }
        let names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        let sources: Vec<&str> = self.entries.iter().map(|e| e.source.as_str()).collect();
        let mut metadata = vec![
            ("format".to_string(), BANK_FORMAT.to_string()),
            ("version".to_string(), BANK_VERSION.to_string()),
            ("weights_hash".to_string(), self.weights_hash.clone()),
            ("size".to_string(), self.size.to_string()),
            ("count".to_string(), self.entries.len().to_string()),
            ("names".to_string(), serde_json::to_string(&names).unwrap()),
            (
                "sources".to_string(),
                serde_json::to_string(&sources).unwrap(),
            ),
        ];
        if let Some(roi) = &self.roi {
            let frame = serde_json::json!({"width": roi.frame.0, "height": roi.frame.1});
            metadata.push(("roi".to_string(), frame.to_string()));
        }
        if let Some(c) = &self.calibration {
            metadata.push(("calibration".to_string(), c.to_json().to_string()));
        }
        write_safetensors(path, &tensors, &metadata)
    }

    /// Reads a bank written by `save` and checks that it belongs to `engine` (same weights
    /// fingerprint, same size). Every problem is one line naming the file.
    pub fn load(path: &Path, engine: &Engine) -> Result<PromptBank> {
        let file = WeightFile::open(path)?;
        PromptBank::read(&file, Some(engine))
    }

    /// Reads and validates a bank (metadata, prompt count, every feature tensor) without
    /// checking which weights it belongs to: for inspection, and for the fuzz target, which
    /// has no engine. Use [`PromptBank::load`] to segment with it.
    pub fn from_weight_file(file: &WeightFile) -> Result<PromptBank> {
        PromptBank::read(file, None)
    }

    fn read(file: &WeightFile, engine: Option<&Engine>) -> Result<PromptBank> {
        let path = file.path();
        if file.format() != Format::Safetensors {
            return Err(Error::at(path, "is not a prompt bank (not safetensors)"));
        }
        let meta = BankMeta::read(file).map_err(|p| Error::at(path, p))?;
        if let Some(engine) = engine {
            if meta.weights_hash != engine.weights_hash() {
                return Err(Error::at(
                    path,
                    format!(
                        "bank was built with other weights ({}; these are {}): rebuild it with `metauas bank build`",
                        meta.weights_hash,
                        engine.weights_hash()
                    ),
                ));
            }
            if meta.size != engine.size() {
                let problem = format!(
                    "bank was built at size {}, this engine runs at size {}",
                    meta.size,
                    engine.size()
                );
                return Err(Error::setting("size", problem).context(path.display()));
            }
        }
        let roi = match meta.roi_frame {
            None => None,
            Some(frame) => {
                let inside = file.tensor_f32("roi", &[meta.size, meta.size])?;
                if inside.iter().any(|&v| v != 0.0 && v != 1.0) {
                    return Err(Error::at(
                        path,
                        "bank tensor `roi` holds values other than 0 and 1",
                    ));
                }
                Some(RoiMask {
                    side: meta.size,
                    inside: inside.iter().map(|&v| v as u8).collect(),
                    frame,
                })
            }
        };
        let mut bank = PromptBank {
            size: meta.size,
            weights_hash: meta.weights_hash,
            entries: Vec::new(),
            roi,
            calibration: meta.calibration,
        };
        let shapes = prompt_shapes(meta.size);
        for (i, (name, source)) in meta.names.into_iter().zip(meta.sources).enumerate() {
            let mut tensors = Vec::with_capacity(shapes.len());
            for (t, shape) in shapes.iter().enumerate() {
                let dims = [shape.h, shape.w, shape.c];
                tensors.push(file.tensor_f32(&format!("prompt.{i}.{t}"), &dims)?);
            }
            let features = PromptFeatures {
                size: meta.size,
                tensors,
            };
            bank.push(BankEntry {
                name,
                source,
                features,
            })
            .map_err(|e| Error::at(path, e))?;
        }
        Ok(bank)
    }
}

/// The bank's metadata, validated.
struct BankMeta {
    weights_hash: String,
    size: usize,
    names: Vec<String>,
    sources: Vec<String>,
    roi_frame: Option<(usize, usize)>,
    calibration: Option<Calibration>,
}

impl BankMeta {
    fn read(file: &WeightFile) -> std::result::Result<BankMeta, String> {
        let get = |key: &str| {
            file.metadata()
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| format!("is not a prompt bank (no `{key}` in its metadata)"))
        };
        if get("format")? != BANK_FORMAT {
            return Err("is not a prompt bank (metadata format is not metauas-prompt-bank)".into());
        }
        let version = get("version")?;
        if !READABLE_VERSIONS.contains(&version) {
            return Err(format!(
                "prompt bank version {version} is not supported (this build reads {})",
                READABLE_VERSIONS.join(" and ")
            ));
        }
        let optional = |key: &str| {
            file.metadata()
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let roi_frame = match optional("roi") {
            None => None,
            Some(text) => {
                let v: serde_json::Value = serde_json::from_str(text)
                    .map_err(|_| "bank metadata `roi` is not JSON".to_string())?;
                let dim = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
                match (dim("width"), dim("height")) {
                    (Some(w), Some(h)) if w > 0 && h > 0 => Some((w as usize, h as usize)),
                    _ => return Err("bank metadata `roi` has no width and height".into()),
                }
            }
        };
        let calibration = match optional("calibration") {
            None => None,
            Some(text) => {
                let v: serde_json::Value = serde_json::from_str(text)
                    .map_err(|_| "bank metadata `calibration` is not JSON".to_string())?;
                Some(
                    Calibration::from_json(&v)
                        .map_err(|e| format!("bank metadata `calibration`: {e}"))?,
                )
            }
        };
        let size: usize = get("size")?
            .parse()
            .map_err(|_| "bank metadata `size` is not a number".to_string())?;
        crate::model::check_size(size).map_err(|e| format!("bank metadata: {e}"))?;
        let list = |key: &str| -> std::result::Result<Vec<String>, String> {
            serde_json::from_str(get(key)?)
                .map_err(|_| format!("bank metadata `{key}` is not a JSON list of strings"))
        };
        let names = list("names")?;
        let sources = list("sources")?;
        let count: usize = get("count")?
            .parse()
            .map_err(|_| "bank metadata `count` is not a number".to_string())?;
        if names.len() != count || sources.len() != count {
            return Err(format!(
                "bank metadata lists {} names and {} sources for {count} prompts",
                names.len(),
                sources.len()
            ));
        }
        if count > MAX_BANK_PROMPTS {
            return Err(format!(
                "bank holds {count} prompts, more than the maximum {MAX_BANK_PROMPTS}"
            ));
        }
        Ok(BankMeta {
            weights_hash: get("weights_hash")?.to_string(),
            size,
            names,
            sources,
            roi_frame,
            calibration,
        })
    }
}

/// The globally average-pooled f5 feature of a prompt (or of a query encoded as one).
pub fn pooled_f5(features: &PromptFeatures) -> Vec<f32> {
    let shape = prompt_shapes(features.size)[0];
    let f5 = &features.tensors[0];
    let mut sum = vec![0f64; shape.c];
    for pixel in f5.chunks_exact(shape.c) {
        for (s, &v) in sum.iter_mut().zip(pixel) {
            *s += f64::from(v);
        }
    }
    let n = (shape.h * shape.w) as f64;
    sum.into_iter().map(|s| (s / n) as f32).collect()
}

/// Cosine similarity in float64 (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Index of the candidate whose pooled f5 is most similar to the query's (the paper's
/// MetaUAS* prompt selection); the first wins a tie. `None` when there are no candidates.
pub fn most_similar<'a>(
    query_pooled: &[f32],
    candidates: impl IntoIterator<Item = &'a [f32]>,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in candidates.into_iter().enumerate() {
        let s = cosine(query_pooled, c);
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_parallel_orthogonal_and_zero_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn most_similar_picks_the_closest_direction_and_the_first_of_a_tie() {
        let q = [1.0, 0.1];
        let c: [&[f32]; 4] = [&[0.0, 1.0], &[10.0, 3.0], &[1.0, 0.1], &[1.0, 0.1]];
        assert_eq!(most_similar(&q, c), Some(2));
        assert_eq!(most_similar(&q, std::iter::empty()), None);
    }

    #[test]
    fn pooled_f5_averages_each_channel_over_pixels() {
        let size = 64; // f5 is 2 x 2 x 448
        let c = prompt_shapes(size)[0].c;
        let mut f5 = vec![0f32; 4 * c];
        for p in 0..4 {
            f5[p * c] = p as f32; // channel 0: 0, 1, 2, 3
            f5[p * c + 1] = 2.0;
        }
        let features = PromptFeatures {
            size,
            tensors: vec![f5],
        };
        let pooled = pooled_f5(&features);
        assert_eq!(pooled.len(), c);
        assert_eq!(pooled[0], 1.5);
        assert_eq!(pooled[1], 2.0);
        assert_eq!(pooled[2], 0.0);
    }
}
