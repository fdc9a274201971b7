"""Reference values for `metauas eval`'s metrics: the authors' evaluator on synthetic data.

Writes tests/fixtures/metrics/metrics.json: synthetic scores, labels, maps and masks (drawn
with fixed seeds) and what the authors' evaluator gives on them. That evaluator is
`Evaluator.run` and `cal_pro_score` in `eval_metric/sklearn_metric.py` of gaobb/MetaUAS (the
file their `test.py` imports), re-typed below in the REFERENCE section; it calls
scikit-learn (`roc_curve` + `auc`, `average_precision_score`, `precision_recall_curve`) and
scikit-image (`measure.label`, `regionprops`). `tests/eval.rs` checks the Rust metrics
against the fixture. Run:

    /opt/refenv/bin/python tools/reference/make_metric_fixtures.py --out tests/fixtures/metrics

Conventions recorded here (and followed by the Rust code):
- Ground-truth masks are float32 0/1 tensors, as the authors' dataset.py makes them
  (`pil_to_tensor(mask) > 0` as float; normal images without a mask: zeros).
- A metric that scikit-learn leaves undefined (AUROC with one label class: `roc_curve`
  warns and returns NaN rates, so `auc` is NaN) is stored as null.
- AUPRO is null where `cal_pro_score` raises or returns NaN: constant maps (np.arange with
  a zero step raises), no defective pixel (the mean of no regions), no normal pixel, no
  threshold with FPR < 0.3 (`fprs.min()` of nothing raises), one such threshold (`auc`
  raises on one point), or all kept FPRs equal (the min-max rescale is 0/0 and `auc`
  returns NaN).
"""

import argparse
import json
import math
import os
import warnings

import numpy as np
import sklearn
import skimage
import torch
from skimage import measure
from sklearn import metrics

warnings.simplefilter("ignore")

# ---------------------------------------------------------------------------------------
# REFERENCE: re-typed from gaobb/MetaUAS, eval_metric/sklearn_metric.py (commit feda9cb),
# `cal_pro_score` and the body of `Evaluator.run`, statement for statement. Only the class
# selection by `cls_names` and the metric loop are left out: the caller passes one class's
# tensors and one metric name, so that a metric that raises does not hide the others.
# ---------------------------------------------------------------------------------------


def reference_cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3):
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pro.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs, ths = np.array(pros), np.array(fprs), np.array(ths)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    pro_auc = metrics.auc(fprs, pros[idxes])
    return pro_auc


def reference_evaluator_run(gt_px, pr_px, gt_sp, metric):
    """`Evaluator.run` for one class (torch tensors: gt_px, pr_px N x 1 x H x W float32,
    gt_sp N) and one metric."""
    pr_px = (pr_px - pr_px.min()) / (pr_px.max() - pr_px.min())
    pr_sp = pr_px.max(dim=-1)[0].max(dim=-1)[0]

    if len(gt_px.shape) == 4:
        gt_px = gt_px.squeeze(1)
    if len(pr_px.shape) == 4:
        pr_px = pr_px.squeeze(1)

    pr_px = pr_px.numpy()
    gt_px = gt_px.numpy()

    pr_sp = pr_sp.numpy()
    gt_sp = gt_sp.numpy()

    if metric.startswith('I-AUROC'):
        fpr, tpr, thresholds = metrics.roc_curve(gt_sp.ravel(), pr_sp.ravel(), pos_label=1)
        i_auc = metrics.auc(fpr, tpr)
        if i_auc < 0.5:
            i_auc = 1 - i_auc
        return i_auc
    elif metric.startswith('P-AUROC'):
        fpr, tpr, thresholds = metrics.roc_curve(gt_px.ravel(), pr_px.ravel(), pos_label=1)
        p_auc = metrics.auc(fpr, tpr)
        if p_auc < 0.5:
            p_auc = 1 - p_auc
        return p_auc
    elif metric.startswith('I-AP'):
        return metrics.average_precision_score(gt_sp.ravel(), pr_sp.ravel(), pos_label=1, average=None)
    elif metric.startswith('P-AP'):
        return metrics.average_precision_score(gt_px.ravel(), pr_px.ravel(), pos_label=1, average=None)
    elif metric.startswith('I-F1max'):
        precisions, recalls, thresholds = metrics.precision_recall_curve(gt_sp.ravel(), pr_sp.ravel())
        f1_scores = (2 * precisions * recalls) / (precisions + recalls)
        return np.max(f1_scores[np.isfinite(f1_scores)])
    elif metric.startswith('P-F1max'):
        precisions, recalls, thresholds = metrics.precision_recall_curve(gt_px.ravel(), pr_px.ravel())
        f1_scores = (2 * precisions * recalls) / (precisions + recalls)
        return np.max(f1_scores[np.isfinite(f1_scores)])
    elif metric.startswith('P-AUPRO'):
        return reference_cal_pro_score(gt_px, pr_px)


# ------------------------------------------------------------------------- end REFERENCE

METRIC_NAMES = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "P-AUPRO"]


def f32_list(a):
    """float32 values in their shortest decimal form; each one reads back (through float64,
    as serde_json does) to the same float32."""
    out = []
    for v in np.asarray(a, dtype=np.float32).ravel():
        short = float(str(v))
        if math.isfinite(short) and short == int(short) and abs(short) < 2**24:
            short = int(short)  # integer-valued maps: no ".0", a smaller file
        assert np.float32(short) == v or (np.isnan(v) and np.isnan(short))
        out.append(short)
    return out


def nan_to_none(v):
    v = float(v)
    return None if math.isnan(v) else v


def guarded(f, *args):
    """The value, or None where the reference raises or returns NaN."""
    try:
        return nan_to_none(f(*args))
    except (ValueError, ZeroDivisionError):
        return None


def ranking(scores, labels):
    """AUROC (before the < 0.5 flip), AP and F1max of one ranking, with the scikit-learn
    calls exactly as `Evaluator.run` makes them."""
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    fpr, tpr, _ = metrics.roc_curve(labels, scores, pos_label=1)
    auroc = metrics.auc(fpr, tpr)
    ap = metrics.average_precision_score(labels, scores, pos_label=1, average=None)
    p, r, _ = metrics.precision_recall_curve(labels, scores)
    f1 = (2 * p * r) / (p + r)
    f1max = np.max(f1[np.isfinite(f1)])
    return {"auroc": nan_to_none(auroc), "ap": nan_to_none(ap), "f1max": nan_to_none(f1max)}


def authors_pro(masks, amaps):
    """`cal_pro_score` on float32 maps and float32 0/1 masks (as dataset.py makes them)."""
    masks = np.asarray(masks, dtype=np.float32)
    amaps = np.asarray(amaps, dtype=np.float32)
    return guarded(reference_cal_pro_score, masks, amaps)


def pro_before_fix(masks, amaps):
    """What `aupro` computed up to commit b307674: kept FPRs divided by the largest only.
    Printed next to the reference, never stored."""
    amaps = np.asarray(amaps, dtype=np.float32)
    inverse = 1 - np.asarray(masks, dtype=np.float32)
    regions = [measure.regionprops(measure.label(m)) for m in masks]
    pros, fprs = [], []
    lo, hi = amaps.min(), amaps.max()
    for th in np.arange(lo, hi, (hi - lo) / 200):
        b = amaps > th
        pros.append(np.mean([bm[r.coords[:, 0], r.coords[:, 1]].sum() / r.area
                             for bm, regs in zip(b, regions) for r in regs]))
        fprs.append(np.logical_and(inverse, b).sum() / inverse.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < 0.3
    return float(metrics.auc(fprs[keep] / fprs[keep].max(), pros[keep]))


def region_areas(masks):
    """Region areas as `cal_pro_score` finds them: `measure.label` with its default
    connectivity, which for 2-D images is full (8-connected)."""
    out = []
    for m in np.asarray(masks, dtype=np.float32):
        out.append(sorted(int(r.area) for r in measure.regionprops(measure.label(m))))
    return out


def ranking_cases(rng):
    cases = []

    def add(name, scores, labels):
        scores = np.asarray(scores, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.uint8)
        cases.append({"name": name, "scores": f32_list(scores), "labels": [int(v) for v in labels],
                      **ranking(scores, labels)})

    add("tiny", [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    add("all_ties", [0.5] * 8, [0, 1, 0, 1, 1, 0, 0, 0])
    add("constant_one_positive", [0.0] * 5, [0, 0, 1, 0, 0])
    add("only_negatives", rng.random(20), np.zeros(20))
    add("only_positives", rng.random(20), np.ones(20))
    add("perfect", [0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])
    add("inverted", [0.9, 0.8, 0.3, 0.2, 0.1], [0, 0, 1, 1, 1])
    add("negative_scores_and_zero", [-1.5, -0.0, 0.0, 2.0, -3.0, 0.0], [0, 1, 0, 1, 0, 1])
    for i in range(6):
        n = int(rng.integers(50, 1200))
        labels = rng.random(n) < rng.uniform(0.02, 0.6)
        scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
        if i % 2 == 0:  # heavy ties
            scores = np.round(scores * 4) / 4
        add(f"random_{i}", scores, labels)
    return cases


def square(h, w, y0, x0, s):
    m = np.zeros((h, w), np.uint8)
    m[y0:y0 + s, x0:x0 + s] = 1
    return m


def pro_case(name, maps, masks):
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.uint8)
    n, h, w = maps.shape
    return {"name": name, "n": n, "height": h, "width": w,
            "maps": f32_list(maps), "masks": [int(v) for v in masks.ravel()],
            "region_areas": region_areas(masks),
            "aupro": authors_pro(masks, maps)}


def pro_cases(rng):
    cases = []

    def add(name, maps, masks):
        cases.append(pro_case(name, maps, masks))

    h, w = 12, 10
    # tiny regions (single pixels) and regions touching diagonally (one region at
    # connectivity 2), next to a good image
    m1 = np.zeros((h, w), np.uint8)
    m1[2, 2] = 1
    m1[3, 3] = 1  # diagonal neighbour of (2, 2): same region
    m1[8, 1] = 1  # isolated single pixel
    m1[5:8, 6:9] = 1
    m1[4, 9] = 1  # touches (5, 8) diagonally
    m2 = np.zeros((h, w), np.uint8)
    masks = np.stack([m1, m2, square(h, w, 0, 0, 2)])
    maps = rng.random((3, h, w)) * 0.5 + masks * 0.4
    add("tiny_and_diagonal", maps, masks)
    # heavy ties: maps quantized to 8 levels
    masks = np.stack([square(16, 16, 3, 4, 5), square(16, 16, 10, 10, 6), np.zeros((16, 16), np.uint8)])
    maps = np.round((rng.random((3, 16, 16)) + masks * 0.6) * 4) / 4
    add("ties", maps, masks)
    # chequerboard mask: every defective pixel touches its diagonal neighbours
    cb = (np.add.outer(np.arange(9), np.arange(9)) % 2 == 0).astype(np.uint8)
    add("chequerboard", rng.random((2, 9, 9)) + np.stack([cb, cb]) * 0.3, np.stack([cb, np.zeros_like(cb)]))
    # all defective, all good, constant maps: undefined
    add("constant_maps", np.full((2, 8, 8), 0.25), np.stack([square(8, 8, 1, 1, 3), np.zeros((8, 8), np.uint8)]))
    add("no_defect", rng.random((2, 8, 8)), np.zeros((2, 8, 8), np.uint8))
    add("all_defect", rng.random((2, 8, 8)), np.ones((2, 8, 8), np.uint8))
    # larger random cases: blobs of random rectangles, maps correlated with the masks
    for i in range(4):
        n, hh, ww = int(rng.integers(3, 6)), 32, 32
        masks = np.zeros((n, hh, ww), np.uint8)
        for k in range(n):
            for _ in range(int(rng.integers(0, 4))):
                y0, x0 = rng.integers(0, hh - 2, size=2)
                sh, sw = rng.integers(1, 9, size=2)
                masks[k, y0:y0 + sh, x0:x0 + sw] = 1
        maps = rng.random((n, hh, ww)) + masks * rng.uniform(0.1, 1.0)
        if i == 3:
            maps = (maps - maps.min()) / (maps.max() - maps.min())  # as normalized in eval
        add(f"random_{i}", maps, masks)
    return cases


def class_case(name, raw, masks, labels, meta=None):
    """The full per-class computation through the reference `Evaluator.run`: float32 torch
    min-max normalization over the class, image score = max of the normalized map, the
    seven metrics (AUROC < 0.5 replaced by 1 - AUROC). `raw_auroc` holds the AUROCs before
    that flip."""
    raw = np.asarray(raw, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.uint8)
    n, h, w = raw.shape
    gt_px = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
    pr_px = torch.from_numpy(raw.copy()).unsqueeze(1)
    gt_sp = torch.from_numpy(labels.astype(np.int64))
    values = {m: guarded(reference_evaluator_run, gt_px, pr_px, gt_sp, m) for m in METRIC_NAMES}
    norm = ((pr_px - pr_px.min()) / (pr_px.max() - pr_px.min())).squeeze(1).numpy()
    scores = norm.reshape(n, -1).max(axis=1)
    case = {
        "name": name, "n": n, "height": h, "width": w,
        "raw_maps": f32_list(raw), "masks": [int(v) for v in masks.ravel()],
        "labels": [int(v) for v in labels],
        "metrics": values,
        "raw_auroc": {"I-AUROC": ranking(scores, labels)["auroc"],
                      "P-AUROC": ranking(norm.ravel(), masks.ravel())["auroc"]},
    }
    if meta is not None:
        case["meta"] = meta
    top = np.unravel_index(np.argmax(norm), norm.shape)
    case_info = {"top_score_on_normal_pixel": bool(masks[top] == 0),
                 "regions": sum(len(a) for a in region_areas(masks))}
    if values["P-AUPRO"] is not None:
        case_info["P-AUPRO before the fix"] = pro_before_fix(masks, norm)
    return case, case_info


def class_cases(rng):
    cases = []
    for i, flip in enumerate([False, True]):
        n, h, w = 6, 16, 16
        labels = np.array([0, 0, 1, 1, 0, 1], np.uint8)
        masks = np.zeros((n, h, w), np.uint8)
        for k in np.flatnonzero(labels):
            y0, x0 = rng.integers(0, 10, size=2)
            masks[k, y0:y0 + 5, x0:x0 + 4] = 1
        raw = (rng.random((n, h, w)) * 0.6 + 0.2).astype(np.float32)
        raw = raw + (-0.15 if flip else 0.15) * masks
        if flip:  # defective images darker overall: image AUROC below 0.5 too
            raw = raw * np.where(labels == 1, 0.7, 1.0)[:, None, None]
        cases.append(class_case(f"class_{i}", raw.astype(np.float32), masks, labels))
    return cases


# --------------------------------------------- cases where the top score is a false alarm


def ellipse(h, w, cy, cx, ry, rx, angle):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    c, s = math.cos(angle), math.sin(angle)
    u = (y - cy) * c + (x - cx) * s
    v = -(y - cy) * s + (x - cx) * c
    return ((u / ry) ** 2 + (v / rx) ** 2 <= 1).astype(np.uint8)


def random_ellipse(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    while not m.any():
        m = ellipse(h, w, *rng.uniform(0, h, size=2), *rng.uniform(0.4, h / 4, size=2),
                    rng.uniform(0, math.pi))
    return m


def false_alarm_maps(rng, masks, labels, alarms):
    """Integer-valued raw maps in [0, 999] (small in JSON; normalized like any map): a noisy
    background, defects raised by a random amount per region (some pixels stay below the
    background), bright false-alarm blobs on `alarms` normal images and the class's single
    highest value on a normal pixel."""
    n, h, w = masks.shape
    raw = np.clip(rng.normal(300, 70, size=(n, h, w)), 0, 700)
    for k in range(n):
        for r in measure.regionprops(measure.label(masks[k])):
            c = r.coords
            raw[k, c[:, 0], c[:, 1]] += rng.uniform(100, 500) + rng.normal(0, 90, size=len(c))
    normal = np.flatnonzero(labels == 0)
    for k in rng.choice(normal, size=alarms, replace=False):
        blob = random_ellipse(rng, h, w).astype(bool)
        raw[k][blob] = rng.uniform(550, 950, size=blob.sum())
    raw = np.clip(np.round(raw), 0, 990)
    k = normal[0]
    y, x = rng.integers(0, h, size=2)
    raw[k, y, x] = 999
    return raw.astype(np.float32)


def false_alarm_class_cases(rng):
    cases = []
    # VisA-style: 104 images, half normal with `maskname: ""` in the meta file, half with
    # one to three elliptical defects (many regions, some of one pixel)
    n, size, cls = 104, 12, "visa_like"
    labels = rng.permutation(np.repeat(np.array([0, 1], np.uint8), n // 2))
    masks = np.zeros((n, size, size), np.uint8)
    for k in np.flatnonzero(labels):
        for _ in range(int(rng.integers(1, 4))):
            masks[k] |= random_ellipse(rng, size, size)
    raw = false_alarm_maps(rng, masks, labels, alarms=12)
    meta = []
    for k in range(n):
        if labels[k]:
            meta.append({"filename": f"{cls}/bad/{k:03}.JPG", "label": 1,
                         "maskname": f"{cls}/mask/{k:03}.png"})
        else:
            meta.append({"filename": f"{cls}/good/{k:03}.JPG", "label": 0, "maskname": ""})
    cases.append(class_case("visa_like_false_alarm", raw, masks, labels, meta))
    # MVTec-style: 42 images, 12 good (no mask), 30 defective
    n, size = 42, 12
    labels = np.array([0] * 12 + [1] * 30, np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for k in np.flatnonzero(labels):
        masks[k] = random_ellipse(rng, size, size)
    raw = false_alarm_maps(rng, masks, labels, alarms=3)
    cases.append(class_case("mvtec_like_false_alarm", raw, masks, labels))
    return cases


def false_alarm_pro_cases(rng, add):
    # the top score on a normal pixel: the smallest kept FPR is above 0
    h = w = 16
    masks = np.stack([random_ellipse(rng, h, w) for _ in range(4)] + [np.zeros((h, w), np.uint8)] * 2)
    maps = (rng.random((6, h, w)) * 0.6 + masks * rng.uniform(0.2, 0.6)).astype(np.float32)
    maps[4, 3, 7] = maps.max() + 0.2
    add("top_score_normal", maps, masks)
    # normal pixels on four levels only (the top one above every defect): the FPR stays the
    # same over runs of thresholds while the PRO falls
    normal_levels = np.array([0.1, 0.35, 0.6, 1.0], np.float32)
    maps = normal_levels[rng.choice(3, p=[0.75, 0.15, 0.1], size=(6, h, w))]
    maps[5, 0, :3] = 1.0
    defect = masks.astype(bool)
    maps[defect] = rng.uniform(0.0, 0.95, size=defect.sum())
    add("repeated_fprs", maps, masks)
    # every kept FPR the same (two normal pixels above all thresholds, the other normal
    # pixels at the minimum): the min-max rescale is 0/0
    m = np.zeros((3, 8, 8), np.uint8)
    m[0, 2:5, 2:6] = 1
    m[1, 6, 6] = 1
    maps = np.zeros((3, 8, 8), np.float32)
    maps[m.astype(bool)] = rng.uniform(0.05, 0.9, size=m.sum())
    maps[2, 0, 0] = maps[2, 7, 7] = 1.0
    add("all_kept_fprs_equal", maps, m)
    # one threshold only below FPR 0.3 (the normal pixels just below the last threshold
    # but one): `auc` of one point raises
    maps = np.full((3, 8, 8), 0.994, np.float32)
    maps[m.astype(bool)] = 1.0
    maps[0, 2, 2] = 0.0
    add("one_kept_fpr", maps, m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/metrics")
    args = ap.parse_args()
    rng = np.random.default_rng(20240613)
    ranking_list = ranking_cases(rng)
    pro_list = pro_cases(rng)
    class_list = class_cases(rng)
    # the false-alarm cases draw from their own seed, leaving the cases above as they were
    rng2 = np.random.default_rng(20261201)
    false_alarm_pro_cases(rng2, lambda name, maps, masks: pro_list.append(pro_case(name, maps, masks)))
    class_list += false_alarm_class_cases(rng2)
    doc = {
        "generator": "tools/reference/make_metric_fixtures.py",
        "reference": "Evaluator.run / cal_pro_score, eval_metric/sklearn_metric.py of gaobb/MetaUAS "
                     "(commit feda9cb), re-typed in the generator",
        "versions": {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                     "scikit-image": skimage.__version__, "torch": torch.__version__.split("+")[0]},
        "ranking": ranking_list,
        "pro": pro_list,
        "class": [c for c, _ in class_list],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "metrics.json")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    for c in doc["ranking"]:
        print("ranking", c["name"], len(c["scores"]), c["auroc"], c["ap"], c["f1max"])
    for c in doc["pro"]:
        areas = c["region_areas"]
        print("pro", c["name"], c["n"], sum(len(a) for a in areas), "regions, aupro", c["aupro"])
    for c, info in class_list:
        print("class", c["name"], c["n"], "images", c["metrics"], c["raw_auroc"], info)


if __name__ == "__main__":
    main()
