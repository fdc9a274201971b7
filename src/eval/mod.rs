//! Evaluation as in the MetaUAS paper (MVTec AD / VisA): per class, one prompt image, every
//! test image segmented, the maps min-max normalized over the class, and the seven metrics
//! of Table 1 (`metrics`). Test sets come from the authors' meta files or the MVTec AD
//! folder layout (`dataset`); `report` writes the tables.
//!
//! Memory stays bounded by one class: its maps (`N * N` float32 each), masks and labels.

pub mod dataset;
pub mod metrics;
pub mod report;

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::image::decode_image_file;
use crate::io::output::{write_atomic, write_npy_f32};
use crate::model::{Engine, PromptFeatures};

pub use dataset::{ClassSet, Sample};
pub use metrics::{ClassMetrics, METRIC_NAMES};

/// One class's result.
#[derive(Clone, Debug)]
pub struct ClassResult {
    pub name: String,
    pub images: usize,
    pub defective: usize,
    pub metrics: ClassMetrics,
}

/// Segments every test image of `class` (calling `progress` after each), then computes the
/// seven metrics. With `save_maps`, writes under `save_maps/CLASS/` each raw map
/// (`<name>.npy`, float32 `N x N`), its ground truth (`<name>_gt.npy`, 0/1) and
/// `index.jsonl` (one line per image: file, label, normalized image score, files).
pub fn evaluate_class(
    engine: &Engine,
    class: &ClassSet,
    save_maps: Option<&Path>,
    mut progress: impl FnMut(&Sample),
) -> Result<ClassResult> {
    let size = engine.size();
    let plane = size * size;
    let n = class.samples.len();
    if n == 0 {
        return Err(Error::new(format!(
            "class `{}` has no test images",
            class.name
        )));
    }
    let save_dir = save_maps.map(|d| d.join(&class.name));
    if let Some(dir) = &save_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::at(dir, format!("cannot create directory: {e}")))?;
    }
    let mut maps = Vec::with_capacity(n * plane);
    let mut masks = Vec::with_capacity(n * plane);
    let mut labels = Vec::with_capacity(n);
    let mut stems = Vec::with_capacity(n);
    let mut prompt: Option<(&Path, PromptFeatures)> = None;
    for sample in &class.samples {
        if prompt.as_ref().is_none_or(|(p, _)| *p != sample.prompt) {
            let features = engine
                .encode_prompt(&decode_image_file(&sample.prompt)?)
                .map_err(|e| e.context(sample.prompt.display()))?;
            prompt = Some((&sample.prompt, features));
        }
        let (_, features) = prompt.as_ref().expect("prompt encoded above");
        let image = decode_image_file(&sample.image)?;
        let map = engine
            .segment(features, &image)
            .map_err(|e| e.context(sample.image.display()))?;
        if map.data.len() != plane || map.data.iter().any(|v| !v.is_finite()) {
            return Err(Error::at(
                &sample.image,
                "the anomaly map holds NaN or infinity",
            ));
        }
        let mask = dataset::load_mask(sample, size)?;
        if let Some(dir) = &save_dir {
            let stem = dataset::map_file_stem(&sample.name);
            write_npy_f32(&dir.join(format!("{stem}.npy")), &map.data, &[size, size])?;
            let gt: Vec<f32> = mask.iter().map(|&m| f32::from(m)).collect();
            write_npy_f32(&dir.join(format!("{stem}_gt.npy")), &gt, &[size, size])?;
            stems.push(stem);
        }
        maps.extend_from_slice(&map.data);
        masks.extend_from_slice(&mask);
        labels.push(sample.label);
        progress(sample);
    }
    let metrics = metrics::class_metrics(&mut maps, &masks, &labels, size, size);
    if let Some(dir) = &save_dir {
        let mut index = String::new();
        for ((sample, stem), map) in class.samples.iter().zip(&stems).zip(maps.chunks(plane)) {
            let score = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let line = serde_json::json!({
                "filename": sample.name,
                "label": sample.label,
                "prompt": sample.prompt.display().to_string(),
                "score": score,
                "map": format!("{stem}.npy"),
                "gt": format!("{stem}_gt.npy"),
            });
            index.push_str(&format!("{line}\n"));
        }
        write_atomic(&dir.join("index.jsonl"), index.as_bytes())?;
    }
    Ok(ClassResult {
        name: class.name.clone(),
        images: n,
        defective: class.defective(),
        metrics,
    })
}
