//! The evaluation report: a table per class plus the mean, as Markdown (percentages, like
//! the paper), CSV and JSON (fractions in [0, 1]; an undefined metric is empty / `null` and
//! left out of the mean).

use std::path::Path;

use serde_json::{json, Map, Value};

use super::metrics::METRIC_NAMES;
use super::ClassResult;
use crate::error::{Error, Result};
use crate::io::output::write_atomic;

/// How the run was made, recorded in every report file.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    pub command: String,
    pub weights: String,
    pub weights_hash: String,
    pub size: usize,
    pub backend: String,
    /// Where the test list and prompts came from, in words.
    pub dataset: String,
}

/// The conventions a reader needs to compare the numbers with the paper's.
pub const NOTES: [&str; 5] = [
    "Maps are min-max normalized over all test images of a class together; the image score is the maximum of the normalized map.",
    "AUROC follows scikit-learn's roc_curve (tied scores form one point, trapezoids); as in the authors' code, an AUROC below 0.5 is reported as 1 - AUROC (listed under flipped_auroc).",
    "AP is scikit-learn's average_precision_score; F1max is the largest finite F1 over precision_recall_curve.",
    "P-AUPRO is the authors' cal_pro_score (eval_metric/sklearn_metric.py of gaobb/MetaUAS): 200 thresholds from the class's smallest to largest map value, PRO over 8-connected ground-truth regions, thresholds with FPR < 0.3 kept and their FPRs min-max rescaled to [0, 1], trapezoid area.",
    "A metric that is undefined for a class (one label class only; AUPRO with constant maps, no defective or no normal pixel, or all kept FPRs equal, e.g. a perfect separation, where the authors' rescale is 0/0) is n/a (null) and left out of the mean.",
];

pub struct Report {
    pub info: RunInfo,
    pub classes: Vec<ClassResult>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn number(v: f64) -> Value {
    finite(v).map_or(Value::Null, |x| json!(x))
}

impl Report {
    /// Per metric, the mean over the classes where it is defined (NaN if none is).
    pub fn mean(&self) -> [f64; 7] {
        let mut out = [f64::NAN; 7];
        for (m, slot) in out.iter_mut().enumerate() {
            let vals: Vec<f64> = self
                .classes
                .iter()
                .filter_map(|c| finite(c.metrics.values[m]))
                .collect();
            if !vals.is_empty() {
                *slot = vals.iter().sum::<f64>() / vals.len() as f64;
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let metrics_object = |values: &[f64; 7]| -> Value {
            let mut m = Map::new();
            for (name, &v) in METRIC_NAMES.iter().zip(values) {
                m.insert(name.to_string(), number(v));
            }
            Value::Object(m)
        };
        let mut classes = Map::new();
        let mut images = Map::new();
        let mut flipped = Vec::new();
        for c in &self.classes {
            classes.insert(c.name.clone(), metrics_object(&c.metrics.values));
            images.insert(
                c.name.clone(),
                json!({"total": c.images, "defective": c.defective}),
            );
            for (metric, raw) in &c.metrics.flipped {
                flipped.push(json!({"class": c.name, "metric": metric, "raw": raw}));
            }
        }
        json!({
            "classes": classes,
            "mean": metrics_object(&self.mean()),
            "images": images,
            "flipped_auroc": flipped,
            "command": self.info.command,
            "weights": self.info.weights,
            "weights_hash": self.info.weights_hash,
            "size": self.info.size,
            "backend": self.info.backend,
            "dataset": self.info.dataset,
            "notes": NOTES,
        })
    }

    pub fn to_markdown(&self) -> String {
        let pct = |v: f64| finite(v).map_or("n/a".to_string(), |x| format!("{:.1}", x * 100.0));
        let mut s = String::from("# MetaUAS evaluation\n\n");
        s.push_str(&format!(
            "- command: `{}`\n- weights: `{}` ({})\n- size: {}\n- backend: {}\n- dataset: {}\n\n",
            self.info.command,
            self.info.weights,
            self.info.weights_hash,
            self.info.size,
            self.info.backend,
            self.info.dataset
        ));
        s.push_str("| class | images | defective |");
        for name in METRIC_NAMES {
            s.push_str(&format!(" {name} |"));
        }
        s.push_str("\n|---|---:|---:|");
        s.push_str(&"---:|".repeat(METRIC_NAMES.len()));
        s.push('\n');
        let row = |s: &mut String, name: &str, images: String, defective: String, v: &[f64; 7]| {
            s.push_str(&format!("| {name} | {images} | {defective} |"));
            for &x in v {
                s.push_str(&format!(" {} |", pct(x)));
            }
            s.push('\n');
        };
        for c in &self.classes {
            row(
                &mut s,
                &c.name,
                c.images.to_string(),
                c.defective.to_string(),
                &c.metrics.values,
            );
        }
        let total: usize = self.classes.iter().map(|c| c.images).sum();
        let defective: usize = self.classes.iter().map(|c| c.defective).sum();
        row(
            &mut s,
            "**mean**",
            total.to_string(),
            defective.to_string(),
            &self.mean(),
        );
        s.push_str("\nValues in %. ");
        s.push_str(&NOTES.join(" "));
        s.push('\n');
        let flips: Vec<String> = self
            .classes
            .iter()
            .flat_map(|c| {
                c.metrics
                    .flipped
                    .iter()
                    .map(move |(m, raw)| format!("{} {m} (raw {:.1})", c.name, raw * 100.0))
            })
            .collect();
        if !flips.is_empty() {
            s.push_str(&format!(
                "\nFlipped AUROC (reported as 1 - AUROC): {}.\n",
                flips.join(", ")
            ));
        }
        s
    }

    pub fn to_csv(&self) -> String {
        let field = |v: &str| {
            if v.contains([',', '"', '\n']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.to_string()
            }
        };
        let value = |v: f64| finite(v).map_or(String::new(), |x| x.to_string());
        let mut s = format!(
            "class,images,defective,{},size,backend,weights_hash,command\n",
            METRIC_NAMES.join(",")
        );
        let tail = format!(
            "{},{},{},{}",
            self.info.size,
            field(&self.info.backend),
            field(&self.info.weights_hash),
            field(&self.info.command)
        );
        let mut row = |name: &str, images: usize, defective: usize, v: &[f64; 7]| {
            let vals: Vec<String> = v.iter().map(|&x| value(x)).collect();
            s.push_str(&format!(
                "{},{images},{defective},{},{tail}\n",
                field(name),
                vals.join(",")
            ));
        };
        for c in &self.classes {
            row(&c.name, c.images, c.defective, &c.metrics.values);
        }
        let total = self.classes.iter().map(|c| c.images).sum();
        let defective = self.classes.iter().map(|c| c.defective).sum();
        row("mean", total, defective, &self.mean());
        s
    }

    /// Writes `report.json`, `report.md` and `report.csv` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.to_json())
            .map_err(|e| Error::new(format!("cannot encode the report: {e}")))?;
        write_atomic(&dir.join("report.json"), format!("{json}\n").as_bytes())?;
        write_atomic(&dir.join("report.md"), self.to_markdown().as_bytes())?;
        write_atomic(
            &dir.join("report.html"),
            super::html::to_html(self).as_bytes(),
        )?;
        write_atomic(&dir.join("report.csv"), self.to_csv().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::ClassMetrics;

    fn class(name: &str, values: [f64; 7]) -> ClassResult {
        ClassResult {
            name: name.into(),
            images: 4,
            defective: 2,
            metrics: ClassMetrics {
                values,
                flipped: vec![],
            },
            curves: Default::default(),
            gallery: vec![],
        }
    }

    #[test]
    fn mean_skips_undefined_and_json_writes_null() {
        let r = Report {
            info: RunInfo::default(),
            classes: vec![
                class("a", [0.5, 1.0, 1.0, 0.8, 0.2, 0.3, f64::NAN]),
                class("b", [0.7, 0.0, 1.0, 0.6, 0.4, 0.5, f64::NAN]),
            ],
        };
        let m = r.mean();
        assert!((m[0] - 0.6).abs() < 1e-12);
        assert!(m[6].is_nan());
        let j = r.to_json();
        assert!(j["mean"]["P-AUPRO"].is_null());
        assert!(j["classes"]["a"]["P-AUPRO"].is_null());
        assert_eq!(j["classes"]["b"]["I-AUROC"], 0.7);
        assert!(r.to_markdown().contains("| a | 4 | 2 | 50.0 |"));
        assert!(r
            .to_csv()
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("a,4,2,0.5,1,1,0.8,"));
    }
}
