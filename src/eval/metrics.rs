//! The seven anomaly metrics of the MetaUAS paper, computed as the authors' evaluator
//! computes them: `Evaluator.run` and `cal_pro_score` in `eval_metric/sklearn_metric.py` of
//! gaobb/MetaUAS (the file `test.py` imports), i.e. scikit-learn's `roc_curve` + `auc`,
//! `average_precision_score` and `precision_recall_curve`, and their AUPRO procedure. Pure
//! functions on float32 scores and 0/1 labels; every sum and ratio in float64.
//!
//! Conventions (checked against that evaluator, re-typed in
//! `tools/reference/make_metric_fixtures.py`, with scikit-learn 1.9 / scikit-image 0.26 by
//! `tests/eval.rs`):
//! - ties: all samples with the same score form one ROC / PR point, as in scikit-learn's
//!   `_binary_clf_curve` (`-0.0` and `0.0` are the same score);
//! - a metric scikit-learn leaves undefined is `NaN` (AUROC with one label class: `roc_curve`
//!   warns and the area is NaN); AP with no positive is 0 and F1max is 0, as sklearn gives;
//! - AUPRO is `NaN` wherever the authors' code raises or returns NaN: constant maps
//!   (`np.arange` with a zero step raises), no defective pixel (PRO is the mean of no
//!   regions), no normal pixel, fewer than two thresholds with FPR < 0.3 (`fprs.min()` of
//!   nothing or `auc` of one point raises), or all kept FPRs equal, where the min-max rescale
//!   `(fprs - fprs.min()) / (fprs.max() - fprs.min())` is 0/0 and `auc` returns NaN;
//! - a NaN score makes every metric of that call NaN.

use rayon::prelude::*;

/// Thresholds of the authors' AUPRO (`max_step`).
pub const PRO_STEPS: usize = 200;
/// AUPRO integrates the PRO curve up to this false positive rate.
pub const PRO_FPR_LIMIT: f64 = 0.3;

/// AUROC, average precision and F1max of one ranking.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ranking {
    /// Area under the ROC curve (scikit-learn's `roc_auc_score`); NaN with one label class.
    pub auroc: f64,
    /// scikit-learn's `average_precision_score`.
    pub ap: f64,
    /// Largest finite F1 over scikit-learn's `precision_recall_curve`.
    pub f1max: f64,
}

impl Ranking {
    const UNDEFINED: Ranking = Ranking {
        auroc: f64::NAN,
        ap: f64::NAN,
        f1max: f64::NAN,
    };
}

/// A sort key that orders float32 values like `<` (with `-0.0 == 0.0`).
fn order_key(v: f32) -> u32 {
    let v = if v == 0.0 { 0.0 } else { v };
    let bits = v.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Cumulative true and false positives at each distinct score, from the highest score
/// down: scikit-learn's `_binary_clf_curve` (without sample weights).
fn binary_curve(scores: &[f32], labels: &[u8]) -> Option<(Vec<u64>, Vec<u64>)> {
    assert_eq!(
        scores.len(),
        labels.len(),
        "scores and labels differ in length"
    );
    if scores.is_empty() || scores.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut keys: Vec<u64> = scores
        .par_iter()
        .zip(labels.par_iter())
        .map(|(&s, &l)| (u64::from(order_key(s)) << 1) | u64::from(l != 0))
        .collect();
    keys.par_sort_unstable();
    let (mut tps, mut fps) = (Vec::new(), Vec::new());
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut iter = keys.iter().rev().peekable();
    while let Some(&k) = iter.next() {
        if k & 1 == 1 {
            tp += 1;
        } else {
            fp += 1;
        }
        let next_differs = iter.peek().is_none_or(|&&n| n >> 1 != k >> 1);
        if next_differs {
            tps.push(tp);
            fps.push(fp);
        }
    }
    Some((tps, fps))
}

/// AUROC, AP and F1max of `scores` against `labels` (non-zero = positive), one sort for all
/// three.
pub fn ranking(scores: &[f32], labels: &[u8]) -> Ranking {
    let Some((tps, fps)) = binary_curve(scores, labels) else {
        return Ranking::UNDEFINED;
    };
    let positives = *tps.last().expect("non-empty curve");
    let negatives = *fps.last().expect("non-empty curve");

    // ROC area by trapezoids from (0, 0), exactly in integers: the sum of
    // d(fps) * (tps + tps_prev) is twice the area in units of 1 / (P * N).
    let auroc = if positives == 0 || negatives == 0 {
        f64::NAN
    } else {
        let (mut prev_tp, mut prev_fp, mut twice) = (0u64, 0u64, 0u128);
        for (&tp, &fp) in tps.iter().zip(&fps) {
            twice += u128::from(fp - prev_fp) * u128::from(tp + prev_tp);
            (prev_tp, prev_fp) = (tp, fp);
        }
        twice as f64 / (2.0 * positives as f64 * negatives as f64)
    };

    // precision_recall_curve: one point per distinct score plus the final (1, 0); with no
    // positive, recall is 1 everywhere (scikit-learn's choice).
    let mut ap = 0.0;
    let mut prev_recall = 0.0;
    let mut f1max = 0.0f64; // the final point (precision 1, recall 0) has F1 = 0
    for (&tp, &fp) in tps.iter().zip(&fps) {
        let precision = tp as f64 / (tp + fp) as f64;
        let recall = if positives == 0 {
            1.0
        } else {
            tp as f64 / positives as f64
        };
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
        let f1 = 2.0 * precision * recall / (precision + recall);
        if f1.is_finite() {
            f1max = f1max.max(f1);
        }
    }
    Ranking { auroc, ap, f1max }
}

/// The F1-optimal threshold: `(threshold, F1)` at the argmax of F1 over scikit-learn's
/// `precision_recall_curve` (a sample is positive when its score is at least the threshold;
/// the lowest threshold wins a tie, as `thresholds[np.argmax(f1)]` picks). `None` without a
/// positive, or with a NaN score.
pub fn f1_optimal(scores: &[f32], labels: &[u8]) -> Option<(f64, f64)> {
    assert_eq!(
        scores.len(),
        labels.len(),
        "scores and labels differ in length"
    );
    if scores.is_empty() || scores.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.par_sort_unstable_by_key(|&i| std::cmp::Reverse(order_key(scores[i])));
    let positives = labels.iter().filter(|&&l| l != 0).count() as u64;
    if positives == 0 {
        return None;
    }
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut best: Option<(f64, f64)> = None;
    for (k, &i) in order.iter().enumerate() {
        if labels[i] != 0 {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_score = order
            .get(k + 1)
            .is_none_or(|&j| order_key(scores[j]) != order_key(scores[i]));
        if last_of_score && tp > 0 {
            let f1 = 2.0 * tp as f64 / (2 * tp + fp + (positives - tp)) as f64;
            // Going down in threshold: `>=` keeps the lowest of equal F1s.
            if best.is_none_or(|(_, b)| f1 >= b) {
                best = Some((f64::from(scores[i]), f1));
            }
        }
    }
    best
}

/// scikit-learn's `roc_auc_score` for binary labels (NaN with one label class).
pub fn roc_auc(scores: &[f32], labels: &[u8]) -> f64 {
    ranking(scores, labels).auroc
}

/// scikit-learn's `average_precision_score`.
pub fn average_precision(scores: &[f32], labels: &[u8]) -> f64 {
    ranking(scores, labels).ap
}

/// The largest finite F1 over scikit-learn's `precision_recall_curve`.
pub fn f1_max(scores: &[f32], labels: &[u8]) -> f64 {
    ranking(scores, labels).f1max
}

/// The authors' convention: an AUROC below 0.5 is reported as `1 - AUROC`.
pub fn flip_auroc(auroc: f64) -> f64 {
    if auroc < 0.5 {
        1.0 - auroc
    } else {
        auroc
    }
}

pub use crate::model::decision::label_regions;

/// The thresholds of the authors' AUPRO on float32 maps with extremes `min < max`:
/// `np.arange(min, max, (max - min) / 200)` as numpy 2 evaluates it on float32 scalars
/// (checked on 30 000 random cases): the step and the length `ceil((max - min) / step)` in
/// float32; then float64 values `min`, `min + step` (the sum taken in float32), and
/// `min + i * d` with `d` the difference of those two in float64. None for a zero step
/// (numpy raises).
pub fn pro_thresholds(min: f32, max: f32) -> Option<Vec<f64>> {
    let step = (max - min) / PRO_STEPS as f32;
    if step == 0.0 || !step.is_finite() {
        return None;
    }
    let len = f64::from((max - min) / step).ceil();
    if len.is_nan() || len < 1.0 {
        return None;
    }
    let len = len as usize;
    let first = f64::from(min);
    let second = f64::from(min + step);
    let d = second - first;
    Some(
        (0..len)
            .map(|i| match i {
                0 => first,
                1 => second,
                _ => first + i as f64 * d,
            })
            .collect(),
    )
}

/// Per-image tallies for AUPRO: for each region (and for the normal pixels), how many of
/// its pixels clear exactly `k` thresholds, `k = 0..=len`.
struct ImageTally {
    normal: Vec<u64>,
    regions: Vec<(u64, Vec<u64>)>,
}

/// The authors' AUPRO (`cal_pro_score`): 200 evenly spaced thresholds from the smallest to
/// the largest value of `maps` (all images of a class, `height x width` each, concatenated);
/// at each, the mean over all 8-connected ground-truth regions of all images of the share
/// of the region above the threshold (PRO), and the false positive rate over normal pixels;
/// thresholds with FPR < 0.3 are kept, their FPRs min-max rescaled to [0, 1] (the smallest
/// kept FPR is not 0 when the class's top score lies on a normal pixel), and the area under
/// PRO(FPR) taken by trapezoids (`sklearn.metrics.auc`). NaN where the authors' code raises
/// or gives NaN (see the module notes).
pub fn aupro(maps: &[f32], masks: &[u8], height: usize, width: usize) -> f64 {
    let Some((fprs, pros)) = pro_curve(maps, masks, height, width) else {
        return f64::NAN;
    };
    if fprs.len() < 2 {
        return f64::NAN;
    }
    let smallest = fprs.iter().copied().fold(f64::INFINITY, f64::min);
    let largest = fprs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = largest - smallest;
    if span == 0.0 {
        return f64::NAN;
    }
    let x: Vec<f64> = fprs.iter().map(|f| (f - smallest) / span).collect();
    trapezoid_auc(&x, &pros)
}

/// The points of the authors' PRO curve that AUPRO integrates: `(FPR, PRO)` at each of its
/// thresholds with FPR < 0.3, in threshold order (before the FPR rescale). `None` where
/// the curve is undefined (see `aupro`).
pub fn pro_curve(
    maps: &[f32],
    masks: &[u8],
    height: usize,
    width: usize,
) -> Option<(Vec<f64>, Vec<f64>)> {
    let plane = height * width;
    assert_eq!(maps.len(), masks.len(), "maps and masks differ in length");
    assert!(
        plane > 0 && maps.len().is_multiple_of(plane),
        "maps are not whole height x width images"
    );
    if maps.is_empty() || maps.iter().any(|v| v.is_nan()) {
        return None;
    }
    let min = maps.iter().copied().fold(f32::INFINITY, f32::min);
    let max = maps.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let thresholds = pro_thresholds(min, max)?;
    let levels = thresholds.len() + 1;
    // A pixel of value v is above thresholds[..k] with k = #{t : t < v} (`amap > th`).
    let above = |v: f32| thresholds.partition_point(|&t| t < f64::from(v));

    let tallies: Vec<ImageTally> = maps
        .par_chunks(plane)
        .zip(masks.par_chunks(plane))
        .map(|(map, mask)| {
            let (labels, count) = label_regions(mask, height, width);
            let mut normal = vec![0u64; levels];
            let mut regions = vec![(0u64, vec![0u64; levels]); count];
            for (&v, &l) in map.iter().zip(&labels) {
                let k = above(v);
                if l == 0 {
                    normal[k] += 1;
                } else {
                    let r = &mut regions[l as usize - 1];
                    r.0 += 1;
                    r.1[k] += 1;
                }
            }
            ImageTally { normal, regions }
        })
        .collect();

    // Suffix sums: pixels above threshold t are those with k > t.
    let above_counts = |hist: &[u64]| -> Vec<u64> {
        let mut out = vec![0u64; levels - 1];
        let mut acc = 0;
        for t in (0..levels - 1).rev() {
            acc += hist[t + 1];
            out[t] = acc;
        }
        out
    };
    let mut normal = vec![0u64; levels];
    let mut region_count = 0usize;
    let mut pro_sum = vec![0.0f64; levels - 1];
    for tally in &tallies {
        for (n, h) in normal.iter_mut().zip(&tally.normal) {
            *n += h;
        }
        for (area, hist) in &tally.regions {
            region_count += 1;
            for (s, tp) in pro_sum.iter_mut().zip(above_counts(hist)) {
                *s += tp as f64 / *area as f64;
            }
        }
    }
    let normal_total: u64 = normal.iter().sum();
    if region_count == 0 || normal_total == 0 {
        return None;
    }
    let fp = above_counts(&normal);
    let (mut fprs, mut pros) = (Vec::new(), Vec::new());
    for (t, &f) in fp.iter().enumerate() {
        let fpr = f as f64 / normal_total as f64;
        if fpr < PRO_FPR_LIMIT {
            fprs.push(fpr);
            pros.push(pro_sum[t] / region_count as f64);
        }
    }
    Some((fprs, pros))
}

/// The ROC curve the AUROC integrates: `(FPR, TPR)` from (0, 0), one point per distinct
/// score (scikit-learn's `roc_curve` without `drop_intermediate`). `None` with one label
/// class or a NaN score.
pub fn roc_points(scores: &[f32], labels: &[u8]) -> Option<Vec<(f64, f64)>> {
    let (tps, fps) = binary_curve(scores, labels)?;
    let (p, n) = (*tps.last()? as f64, *fps.last()? as f64);
    if p == 0.0 || n == 0.0 {
        return None;
    }
    let mut out = vec![(0.0, 0.0)];
    out.extend(
        tps.iter()
            .zip(&fps)
            .map(|(&tp, &fp)| (fp as f64 / n, tp as f64 / p)),
    );
    Some(out)
}

/// The precision-recall curve AP sums: `(recall, precision)` per distinct score, from the
/// highest score down. `None` without a positive or with a NaN score.
pub fn pr_points(scores: &[f32], labels: &[u8]) -> Option<Vec<(f64, f64)>> {
    let (tps, fps) = binary_curve(scores, labels)?;
    let p = *tps.last()? as f64;
    if p == 0.0 {
        return None;
    }
    Some(
        tps.iter()
            .zip(&fps)
            .map(|(&tp, &fp)| (tp as f64 / p, tp as f64 / (tp + fp) as f64))
            .collect(),
    )
}

/// `sklearn.metrics.auc`: trapezoids, sign flipped when `x` decreases.
fn trapezoid_auc(x: &[f64], y: &[f64]) -> f64 {
    let mut area = 0.0;
    let mut decreasing = false;
    for i in 1..x.len() {
        let dx = x[i] - x[i - 1];
        decreasing |= dx < 0.0;
        area += dx * (y[i] + y[i - 1]) / 2.0;
    }
    if decreasing {
        -area
    } else {
        area
    }
}

/// Min-max normalization over all maps of a class together, in float32 as numpy does it on
/// float32 arrays: `(v - min) / (max - min)`. Constant maps (where the authors' code would
/// divide 0 by 0) become all 0.
pub fn normalize_min_max(maps: &mut [f32]) {
    let min = maps.iter().copied().fold(f32::INFINITY, f32::min);
    let max = maps.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    if range > 0.0 && range.is_finite() {
        maps.par_iter_mut().for_each(|v| *v = (*v - min) / range);
    } else {
        maps.iter_mut().for_each(|v| *v = 0.0);
    }
}

/// The names of the seven metrics, in the paper's order.
pub const METRIC_NAMES: [&str; 7] = [
    "I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "P-AUPRO",
];

/// The seven metrics of one class, in `METRIC_NAMES` order, and which AUROCs were flipped.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassMetrics {
    pub values: [f64; 7],
    /// `(metric name, AUROC before the flip)` for every AUROC reported as `1 - AUROC`.
    pub flipped: Vec<(&'static str, f64)>,
}

/// All seven metrics of a class from its raw maps (`n` images of `height x width`,
/// concatenated; normalized here in place), ground-truth masks and image labels.
pub fn class_metrics(
    maps: &mut [f32],
    masks: &[u8],
    labels: &[u8],
    height: usize,
    width: usize,
) -> ClassMetrics {
    let plane = height * width;
    assert_eq!(maps.len(), labels.len() * plane, "maps do not match labels");
    normalize_min_max(maps);
    let scores: Vec<f32> = maps
        .chunks(plane)
        .map(|m| m.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect();
    let image = ranking(&scores, labels);
    let pixel = ranking(maps, masks);
    let pro = aupro(maps, masks, height, width);
    let mut flipped = Vec::new();
    let mut flip = |name: &'static str, v: f64| {
        let f = flip_auroc(v);
        if f != v {
            flipped.push((name, v));
        }
        f
    };
    let values = [
        flip("I-AUROC", image.auroc),
        image.ap,
        image.f1max,
        flip("P-AUROC", pixel.auroc),
        pixel.ap,
        pixel.f1max,
        pro,
    ];
    ClassMetrics { values, flipped }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_on_a_hand_computed_case() {
        // scores 0.1 0.4 0.35 0.8, labels 0 0 1 1: sklearn gives 0.75, AP 0.8333, F1 0.8.
        let r = ranking(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]);
        assert!((r.auroc - 0.75).abs() < 1e-12);
        assert!((r.ap - 5.0 / 6.0).abs() < 1e-12);
        assert!((r.f1max - 0.8).abs() < 1e-12);
    }

    #[test]
    fn one_label_class_is_undefined_auroc() {
        let r = ranking(&[0.1, 0.2, 0.3], &[0, 0, 0]);
        assert!(r.auroc.is_nan());
        assert_eq!(r.ap, 0.0);
        assert_eq!(r.f1max, 0.0);
        let r = ranking(&[0.1, 0.2, 0.3], &[1, 1, 1]);
        assert!(r.auroc.is_nan());
        assert_eq!(r.ap, 1.0);
        assert_eq!(r.f1max, 1.0);
    }

    #[test]
    fn ties_form_one_point_and_signed_zeros_tie() {
        assert_eq!(roc_auc(&[0.5; 4], &[0, 1, 0, 1]), 0.5);
        assert_eq!(roc_auc(&[-0.0, 0.0], &[0, 1]), 0.5);
        assert!(ranking(&[f32::NAN, 1.0], &[0, 1]).auroc.is_nan());
    }

    #[test]
    fn flip_only_below_half() {
        assert_eq!(flip_auroc(0.25), 0.75);
        assert_eq!(flip_auroc(0.5), 0.5);
        assert!(flip_auroc(f64::NAN).is_nan());
    }

    #[test]
    fn regions_are_8_connected() {
        #[rustfmt::skip]
        let mask = [
            1, 0, 0, 1,
            0, 1, 0, 0,
            0, 0, 0, 1,
            1, 1, 0, 1,
        ];
        let (labels, count) = label_regions(&mask, 4, 4);
        assert_eq!(count, 4);
        assert_eq!(labels[0], labels[5]); // diagonal neighbours
        assert_eq!(labels[3], 2);
        assert_eq!(labels[11], labels[15]);
        assert_ne!(labels[12], labels[15]);
    }

    #[test]
    fn thresholds_follow_numpy_arange() {
        // np.arange(np.float32(0), np.float32(1), np.float32(1) / 200): 200 values.
        let t = pro_thresholds(0.0, 1.0).unwrap();
        assert_eq!(t.len(), 200);
        assert_eq!(t[1], f64::from(0.005f32));
        assert!(pro_thresholds(0.3, 0.3).is_none());
    }

    #[test]
    fn perfect_maps_give_the_authors_nan_aupro() {
        // Two 4x4 images; the defect scores 1, everything else 0: every kept FPR is 0, so
        // the authors' min-max rescale of the FPRs is 0/0 and their AUPRO NaN.
        let mut masks = vec![0u8; 32];
        masks[5] = 1;
        masks[6] = 1;
        let mut maps: Vec<f32> = masks.iter().map(|&m| f32::from(m)).collect();
        assert!(aupro(&maps, &masks, 4, 4).is_nan());
        // One normal pixel above most thresholds: PRO stays 1, the area is 1.
        maps[20] = 0.9;
        assert!((aupro(&maps, &masks, 4, 4) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn aupro_rescales_fprs_from_the_smallest_kept_one() {
        // The top score is a false alarm: normal pixel 20 scores 1, normal pixel 21 scores
        // 0.25, the defect (pixels 5, 6) 0.5. Kept FPRs are 2/30 (PRO 1) below 0.25, then
        // 1/30 (PRO 1, then 0): rescaled from 1/30 to [0, 1] the area is 1; dividing by the
        // largest only (x = 1 and 0.5) would give 0.5.
        let mut masks = vec![0u8; 32];
        masks[5] = 1;
        masks[6] = 1;
        let mut maps: Vec<f32> = masks.iter().map(|&m| 0.5 * f32::from(m)).collect();
        maps[20] = 1.0;
        maps[21] = 0.25;
        assert!((aupro(&maps, &masks, 4, 4) - 1.0).abs() < 1e-12);
        // Without pixel 21 every kept FPR is 1/30: the rescale is 0/0, the authors' NaN.
        maps[21] = 0.0;
        assert!(aupro(&maps, &masks, 4, 4).is_nan());
    }

    #[test]
    fn normalization_of_constant_maps_is_zero() {
        let mut m = vec![0.7f32; 6];
        normalize_min_max(&mut m);
        assert!(m.iter().all(|&v| v == 0.0));
        let mut m = vec![1.0f32, 3.0, 2.0];
        normalize_min_max(&mut m);
        assert_eq!(m, vec![0.0, 1.0, 0.5]);
    }
}
