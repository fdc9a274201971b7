//! Evaluation as in the MetaUAS paper (MVTec AD / VisA): per class, one prompt image, every
//! test image segmented, the maps min-max normalized over the class, and the seven metrics
//! of Table 1 (`metrics`). Test sets come from the authors' meta files or the MVTec AD
//! folder layout (`dataset`); `report` writes the tables.
//!
//! Memory stays bounded by one class: its maps (`N * N` float32 each), masks and labels.

pub mod dataset;
mod html;
pub mod metrics;
pub mod report;

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::image::decode_image_file;
use crate::io::output::{
    blend_half, heatmap_rgb, rgb_png_bytes, write_atomic, write_npy_f32, HeatmapScale,
};
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
    /// The curves the metrics integrate, for the HTML report.
    pub curves: ClassCurves,
    /// The most confident misses and false alarms, for the HTML report.
    pub gallery: Vec<GalleryItem>,
}

/// Curve points, `(x, y)` in [0, 1]: image-level ROC and PR exactly as the metrics
/// integrate them; pixel-level ones thinned to at most about a thousand points; the PRO
/// curve (FPR < 0.3, before the authors' rescale).
#[derive(Clone, Debug, Default)]
pub struct ClassCurves {
    pub image_roc: Option<Vec<(f64, f64)>>,
    pub image_pr: Option<Vec<(f64, f64)>>,
    pub pixel_roc: Option<Vec<(f64, f64)>>,
    pub pixel_pr: Option<Vec<(f64, f64)>>,
    pub pro: Option<Vec<(f64, f64)>>,
}

/// One test image of the gallery: a small overlay with the ground truth outlined.
#[derive(Clone, Debug)]
pub struct GalleryItem {
    pub name: String,
    /// `miss` (a defective image scored low) or `false alarm` (a good one scored high).
    pub kind: &'static str,
    /// The normalized image score.
    pub score: f32,
    pub png: Vec<u8>,
}

/// Keeps the first and last points and every point at least `step` (in x + y) from the
/// last kept one: the drawn polyline stays within `step` of the curve.
fn thin(points: Vec<(f64, f64)>, step: f64) -> Vec<(f64, f64)> {
    let Some(&last) = points.last() else {
        return points;
    };
    let mut out: Vec<(f64, f64)> = Vec::new();
    for p in points {
        match out.last() {
            Some(&(x, y)) if (p.0 - x).abs() + (p.1 - y).abs() < step => {}
            _ => out.push(p),
        }
    }
    if out.last() != Some(&last) {
        out.push(last);
    }
    out
}

fn class_curves(maps: &[f32], masks: &[u8], labels: &[u8], size: usize) -> ClassCurves {
    let plane = size * size;
    let scores: Vec<f32> = maps
        .chunks(plane)
        .map(|m| m.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    ClassCurves {
        image_roc: metrics::roc_points(&scores, labels),
        image_pr: metrics::pr_points(&scores, labels),
        pixel_roc: metrics::roc_points(maps, masks).map(|p| thin(p, 2e-3)),
        pixel_pr: metrics::pr_points(maps, masks).map(|p| thin(p, 2e-3)),
        pro: metrics::pro_curve(maps, masks, size, size)
            .map(|(f, p)| thin(f.into_iter().zip(p).collect(), 0.0)),
    }
}

/// The three defective images with the lowest scores and the three good ones with the
/// highest, each as a 128-pixel overlay (normalized map, fixed colour scale) with the
/// ground truth outlined in green.
fn gallery(class: &ClassSet, maps: &[f32], masks: &[u8], size: usize) -> Result<Vec<GalleryItem>> {
    let plane = size * size;
    let scored: Vec<(usize, f32)> = maps
        .chunks(plane)
        .map(|m| m.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .enumerate()
        .collect();
    let mut misses: Vec<(usize, f32)> = scored
        .iter()
        .copied()
        .filter(|&(i, _)| class.samples[i].label != 0)
        .collect();
    misses.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut alarms: Vec<(usize, f32)> = scored
        .iter()
        .copied()
        .filter(|&(i, _)| class.samples[i].label == 0)
        .collect();
    alarms.sort_by(|a, b| b.1.total_cmp(&a.1));
    let picks = misses
        .into_iter()
        .take(3)
        .map(|p| (p, "miss"))
        .chain(alarms.into_iter().take(3).map(|p| (p, "false alarm")));
    let mut out = Vec::new();
    for ((i, score), kind) in picks {
        let sample = &class.samples[i];
        let image = crate::io::image::resize_rgb8(&decode_image_file(&sample.image)?, size);
        let map = &maps[i * plane..][..plane];
        let mask = &masks[i * plane..][..plane];
        let heat = heatmap_rgb(map, HeatmapScale::Fixed);
        let mut rgb = blend_half(&heat, &image.data);
        for y in 0..size {
            for x in 0..size {
                let at = |yy: usize, xx: usize| mask[yy * size + xx] != 0;
                let edge = at(y, x)
                    && (x == 0
                        || y == 0
                        || x + 1 == size
                        || y + 1 == size
                        || !at(y - 1, x)
                        || !at(y + 1, x)
                        || !at(y, x - 1)
                        || !at(y, x + 1));
                if edge {
                    rgb[(y * size + x) * 3..][..3].copy_from_slice(&[0, 255, 0]);
                }
            }
        }
        let (small, side) = shrink(&rgb, size, 128);
        let png = rgb_png_bytes(&small, side, side).map_err(Error::new)?;
        out.push(GalleryItem {
            name: sample.name.clone(),
            kind,
            score,
            png,
        });
    }
    Ok(out)
}

/// Averages `factor x factor` blocks down to about `target` pixels a side.
fn shrink(rgb: &[u8], size: usize, target: usize) -> (Vec<u8>, usize) {
    let factor = (size / target).max(1);
    let side = size / factor;
    let mut out = Vec::with_capacity(side * side * 3);
    for y in 0..side {
        for x in 0..side {
            for c in 0..3 {
                let mut sum = 0u32;
                for dy in 0..factor {
                    for dx in 0..factor {
                        sum += u32::from(rgb[((y * factor + dy) * size + x * factor + dx) * 3 + c]);
                    }
                }
                out.push((sum / (factor * factor) as u32) as u8);
            }
        }
    }
    (out, side)
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
    // `class_metrics` normalized the maps: the curves and pictures use them as they are now.
    let curves = class_curves(&maps, &masks, &labels, size);
    let gallery = gallery(class, &maps, &masks, size)?;
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
        curves,
        gallery,
    })
}
