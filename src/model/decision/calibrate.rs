//! Thresholds from normal images only: the image-level threshold from the normal images'
//! scores, the pixel-level one from every inspected normal pixel, each by a rule (`max`,
//! `quantile:Q`, `sigma:K`), with the statistics behind them kept for the record.
//!
//! Statistics follow numpy on the values as float64: the mean, `std` with `ddof=0`, and
//! quantiles by numpy's default (`method="linear"`: interpolation between the sorted values
//! around `q * (n - 1)`), checked against numpy in `tests/decision.rs`.

use std::str::FromStr;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::RoiMask;
use crate::error::{Error, Result};
use crate::model::engine::AnomalyMap;
use crate::model::select::PromptSelection;

/// The quantiles the statistics record.
pub const RECORDED_QUANTILES: [f64; 6] = [0.5, 0.9, 0.95, 0.99, 0.995, 0.999];
/// Fewer calibration images than this get a warning.
pub const FEW_IMAGES: usize = 10;
/// Most images one calibration takes (every pixel is kept: 4 bytes each).
pub const MAX_CALIBRATION_IMAGES: usize = 4096;

/// How a threshold follows from normal values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    /// The largest normal value.
    Max,
    /// numpy's `quantile(values, q)`, `0 <= q <= 1`.
    Quantile(f64),
    /// `mean + k * std`.
    Sigma(f64),
}

impl FromStr for Rule {
    type Err = Error;

    /// `max`, `quantile:Q` (0 <= Q <= 1) or `sigma:K` (K finite).
    fn from_str(text: &str) -> Result<Rule> {
        let bad = |why: &str| {
            Error::new(format!(
                "threshold rule `{text}`: {why} (expected max, quantile:Q with 0 <= Q <= 1, or sigma:K)"
            ))
        };
        let number = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite());
        match text.split_once(':') {
            None if text.trim() == "max" => Ok(Rule::Max),
            Some(("quantile", q)) => match number(q) {
                Some(q) if (0.0..=1.0).contains(&q) => Ok(Rule::Quantile(q)),
                _ => Err(bad("Q is not a number from 0 to 1")),
            },
            Some(("sigma", k)) => number(k)
                .map(Rule::Sigma)
                .ok_or_else(|| bad("K is not a finite number")),
            _ => Err(bad("unknown rule")),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Max => write!(f, "max"),
            Rule::Quantile(q) => write!(f, "quantile:{q}"),
            Rule::Sigma(k) => write!(f, "sigma:{k}"),
        }
    }
}

/// Summary of a set of normal values (numpy's conventions, float64).
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// `(q, numpy.quantile(values, q))` for each of `RECORDED_QUANTILES`.
    pub quantiles: Vec<(f64, f64)>,
}

/// numpy's `quantile(values, q)` (method `linear`) of ascending `sorted` values, in
/// numpy's float64 steps: the virtual index `(n - 1) q`, and its `_lerp`, which
/// interpolates from the upper sample when the fraction is at least one half.
pub fn quantile_of_sorted(sorted: &[f32], q: f64) -> f64 {
    let last = sorted.len() - 1;
    let virtual_index = last as f64 * q;
    let previous = virtual_index.floor();
    let gamma = virtual_index - previous;
    let at = |i: f64| f64::from(sorted[(i.max(0.0) as usize).min(last)]);
    let (a, b) = (at(previous), at(previous + 1.0));
    let diff = b - a;
    if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    }
}

impl Stats {
    /// Sorts `values` (ascending) and summarizes them. Panics on an empty slice.
    pub fn of(values: &mut [f32]) -> Stats {
        assert!(!values.is_empty(), "statistics of no values");
        values.par_sort_unstable_by(f32::total_cmp);
        let n = values.len() as f64;
        let mean = values.par_iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = values
            .par_iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        Stats {
            count: values.len(),
            mean,
            std: var.sqrt(),
            min: f64::from(values[0]),
            max: f64::from(values[values.len() - 1]),
            quantiles: RECORDED_QUANTILES
                .iter()
                .map(|&q| (q, quantile_of_sorted(values, q)))
                .collect(),
        }
    }

    fn to_json(&self) -> Value {
        let quantiles: serde_json::Map<String, Value> = self
            .quantiles
            .iter()
            .map(|(q, v)| (q.to_string(), json!(v)))
            .collect();
        json!({
            "count": self.count, "mean": self.mean, "std": self.std,
            "min": self.min, "max": self.max, "quantiles": quantiles,
        })
    }

    fn from_json(v: &Value) -> std::result::Result<Stats, String> {
        let quantiles = v
            .get("quantiles")
            .and_then(Value::as_object)
            .ok_or("no `quantiles`")?
            .iter()
            .map(|(q, v)| Some((q.parse().ok()?, v.as_f64()?)))
            .collect::<Option<Vec<(f64, f64)>>>()
            .ok_or("`quantiles` is not a map of numbers")?;
        Ok(Stats {
            count: get_f64(v, "count")? as usize,
            mean: get_f64(v, "mean")?,
            std: get_f64(v, "std")?,
            min: get_f64(v, "min")?,
            max: get_f64(v, "max")?,
            quantiles,
        })
    }
}

fn get_f64(v: &Value, key: &str) -> std::result::Result<f64, String> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("no number `{key}`"))
}

/// One calibrated threshold and how it was found.
#[derive(Clone, Debug, PartialEq)]
pub struct CalibratedThreshold {
    pub rule: Rule,
    /// The rule's value is multiplied by `1 + margin`.
    pub margin: f64,
    pub value: f64,
    pub stats: Stats,
}

impl CalibratedThreshold {
    /// Applies `rule` and `margin` to `values` (sorted in place).
    pub fn from_values(values: &mut [f32], rule: Rule, margin: f64) -> CalibratedThreshold {
        let stats = Stats::of(values);
        let base = match rule {
            Rule::Max => stats.max,
            Rule::Quantile(q) => quantile_of_sorted(values, q),
            Rule::Sigma(k) => stats.mean + k * stats.std,
        };
        CalibratedThreshold {
            rule,
            margin,
            value: base * (1.0 + margin),
            stats,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "rule": self.rule.to_string(), "margin": self.margin, "value": self.value,
            "stats": self.stats.to_json(),
        })
    }

    fn from_json(v: &Value) -> std::result::Result<CalibratedThreshold, String> {
        let rule = v.get("rule").and_then(Value::as_str).ok_or("no `rule`")?;
        Ok(CalibratedThreshold {
            rule: rule.parse().map_err(|e: Error| e.to_string())?,
            margin: get_f64(v, "margin")?,
            value: get_f64(v, "value")?,
            stats: Stats::from_json(v.get("stats").ok_or("no `stats`")?)?,
        })
    }
}

/// F1-optimal thresholds from a labeled set: reported beside the calibration, never used
/// unless asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct F1Thresholds {
    /// `(threshold, F1)` over image scores, and over pixels of the images with masks.
    pub image: Option<(f64, f64)>,
    pub pixel: Option<(f64, f64)>,
    /// Labeled images used (normal, defective).
    pub images: (usize, usize),
}

/// What `bank calibrate` stores in a bank.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    pub image: CalibratedThreshold,
    pub pixel: CalibratedThreshold,
    /// How the bank's prompts were used for the calibration images.
    pub selection: PromptSelection,
    /// The normal images used, as named on input.
    pub images: Vec<String>,
    pub f1: Option<F1Thresholds>,
}

/// How a selection is spelled (`best`, `mean`, `min`): the inverse of `parse_selection`.
pub fn selection_name(s: PromptSelection) -> &'static str {
    match s {
        PromptSelection::Best => "best",
        PromptSelection::Mean => "mean",
        PromptSelection::Min => "min",
    }
}

/// Parses `best`, `mean` or `min`.
pub fn parse_selection(text: &str) -> Option<PromptSelection> {
    match text {
        "best" => Some(PromptSelection::Best),
        "mean" => Some(PromptSelection::Mean),
        "min" => Some(PromptSelection::Min),
        _ => None,
    }
}

impl Calibration {
    pub fn to_json(&self) -> Value {
        let pair = |p: Option<(f64, f64)>| p.map(|(t, f1)| json!({"threshold": t, "f1": f1}));
        let mut v = json!({
            "image": self.image.to_json(),
            "pixel": self.pixel.to_json(),
            "multi": selection_name(self.selection),
            "images": self.images,
        });
        if let Some(f1) = &self.f1 {
            v["f1_optimal"] = json!({
                "image": pair(f1.image), "pixel": pair(f1.pixel),
                "normal_images": f1.images.0, "defective_images": f1.images.1,
            });
        }
        v
    }

    pub fn from_json(v: &Value) -> std::result::Result<Calibration, String> {
        let part = |key: &str| {
            CalibratedThreshold::from_json(v.get(key).ok_or(format!("no `{key}`"))?)
                .map_err(|e| format!("`{key}`: {e}"))
        };
        let multi = v.get("multi").and_then(Value::as_str).unwrap_or("");
        let images = v
            .get("images")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|s| s.as_str().map(String::from)).collect())
            .ok_or("`images` is not a list of names")?;
        let pair = |x: Option<&Value>| {
            let x = x?;
            Some((x.get("threshold")?.as_f64()?, x.get("f1")?.as_f64()?))
        };
        let f1 = v.get("f1_optimal").map(|f| F1Thresholds {
            image: pair(f.get("image")),
            pixel: pair(f.get("pixel")),
            images: (
                f.get("normal_images").and_then(Value::as_u64).unwrap_or(0) as usize,
                f.get("defective_images")
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as usize,
            ),
        });
        Ok(Calibration {
            image: part("image")?,
            pixel: part("pixel")?,
            selection: parse_selection(multi).ok_or("`multi` is not best, mean or min")?,
            images,
            f1,
        })
    }
}

/// Collects the maps of normal images, then computes a `Calibration`.
///
/// ```
/// use metauas::model::decision::{Calibrator, Rule};
/// use metauas::model::{AnomalyMap, PromptSelection};
///
/// let mut calibrator = Calibrator::new(None);
/// for (i, top) in [0.2f32, 0.3, 0.25].into_iter().enumerate() {
///     let map = AnomalyMap { size: 2, data: vec![0.1, 0.1, 0.1, top] };
///     calibrator.add(&format!("good{i}.png"), &map)?;
/// }
/// let c = calibrator.finish(Rule::Max, 0.1, Rule::Quantile(0.999), PromptSelection::Best)?;
/// assert!((c.image.value - 0.3f32 as f64 * 1.1).abs() < 1e-12);
/// assert_eq!(c.pixel.stats.count, 12);
/// # Ok::<(), metauas::Error>(())
/// ```
pub struct Calibrator {
    roi: Option<RoiMask>,
    scores: Vec<f32>,
    pixels: Vec<f32>,
    images: Vec<String>,
}

impl Calibrator {
    /// With an ROI, only its pixels count (the map is 0 outside it).
    pub fn new(roi: Option<RoiMask>) -> Calibrator {
        Calibrator {
            roi,
            scores: Vec::new(),
            pixels: Vec::new(),
            images: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Adds the map of one normal image (with the ROI already applied or not: outside
    /// pixels are skipped here either way).
    pub fn add(&mut self, name: &str, map: &AnomalyMap) -> Result<()> {
        if self.images.len() >= MAX_CALIBRATION_IMAGES {
            return Err(Error::new(format!(
                "a calibration takes at most {MAX_CALIBRATION_IMAGES} images"
            )));
        }
        let inside = |i: usize| self.roi.as_ref().is_none_or(|r| r.inside[i] != 0);
        if let Some(roi) = &self.roi {
            if roi.side != map.size {
                return Err(Error::new(format!(
                    "the inspection mask is {0}x{0}, the map {1}x{1}",
                    roi.side, map.size
                )));
            }
        }
        if map.data.iter().any(|v| !v.is_finite()) {
            return Err(Error::new(format!(
                "the map of `{name}` holds NaN or infinity"
            )));
        }
        let before = self.pixels.len();
        self.pixels.extend(
            (0..map.data.len())
                .filter(|&i| inside(i))
                .map(|i| map.data[i]),
        );
        let score = self.pixels[before..]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        self.scores.push(score);
        self.images.push(name.to_string());
        Ok(())
    }

    /// The thresholds: `image_rule` over the images' scores times `1 + margin`, and
    /// `pixel_rule` over every inspected pixel.
    pub fn finish(
        mut self,
        image_rule: Rule,
        margin: f64,
        pixel_rule: Rule,
        selection: PromptSelection,
    ) -> Result<Calibration> {
        if self.images.is_empty() {
            return Err(Error::new("no calibration images"));
        }
        if !margin.is_finite() || margin <= -1.0 {
            return Err(Error::new(format!(
                "margin {margin}: must be a finite number above -1"
            )));
        }
        if self.pixels.is_empty() || self.scores.iter().any(|s| !s.is_finite()) {
            return Err(Error::new(
                "the calibration maps have no finite inspected pixel",
            ));
        }
        Ok(Calibration {
            image: CalibratedThreshold::from_values(&mut self.scores, image_rule, margin),
            pixel: CalibratedThreshold::from_values(&mut self.pixels, pixel_rule, 0.0),
            selection,
            images: self.images,
            f1: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print_back() {
        for text in [
            "max",
            "quantile:0.99",
            "sigma:3",
            "sigma:-0.5",
            "quantile:1",
        ] {
            let rule: Rule = text.parse().unwrap();
            assert_eq!(rule.to_string().parse::<Rule>().unwrap(), rule);
        }
        for bad in [
            "",
            "mean",
            "quantile",
            "quantile:1.5",
            "quantile:x",
            "sigma:inf",
            "max:2",
        ] {
            let e = bad.parse::<Rule>().unwrap_err().to_string();
            assert!(e.contains("threshold rule") && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn calibration_round_trips_through_json() {
        let mut c = Calibrator::new(None);
        for i in 0..4 {
            let map = AnomalyMap {
                size: 2,
                data: vec![0.1 * i as f32, 0.05, 0.2, 0.3],
            };
            c.add(&format!("n{i}"), &map).unwrap();
        }
        let mut cal = c
            .finish(
                Rule::Sigma(3.0),
                0.0,
                Rule::Quantile(0.999),
                PromptSelection::Min,
            )
            .unwrap();
        cal.f1 = Some(F1Thresholds {
            image: Some((0.4, 0.9)),
            pixel: None,
            images: (3, 2),
        });
        let text = cal.to_json().to_string();
        let back = Calibration::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, cal);
    }
}
