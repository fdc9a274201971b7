"""Reference values for `metauas eval`'s metrics, from scikit-learn and scikit-image.

Writes tests/fixtures/metrics/metrics.json: synthetic scores, labels, maps and masks (drawn
with a fixed seed) and what scikit-learn / scikit-image (and the authors' AUPRO procedure,
re-typed below from its description) give on them. `tests/eval.rs` checks the Rust metrics
against it. Run:

    /opt/refenv/bin/python tools/reference/make_metric_fixtures.py --out tests/fixtures/metrics

Conventions recorded here (and followed by the Rust code):
- A metric that scikit-learn leaves undefined (roc_auc_score with one label class returns
  NaN with an UndefinedMetricWarning; older versions raise) is stored as null.
- AUPRO is null where the authors' code would fail or return NaN: constant maps
  (np.arange with a zero step raises), no defective pixel (mean of no regions), no normal
  pixel, fewer than two thresholds with FPR < 0.3 (sklearn.metrics.auc raises), or a largest
  kept FPR of 0 (0/0).
"""

import argparse
import json
import math
import os
import warnings

import numpy as np
import sklearn
import skimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

warnings.simplefilter("ignore")


def f32_list(a):
    """float32 values in their shortest decimal form; each one reads back (through float64,
    as serde_json does) to the same float32."""
    out = []
    for v in np.asarray(a, dtype=np.float32).ravel():
        short = float(str(v))
        assert np.float32(short) == v or (np.isnan(v) and np.isnan(short))
        out.append(short)
    return out


def nan_to_none(v):
    v = float(v)
    return None if math.isnan(v) else v


def ranking(scores, labels):
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    auroc = roc_auc_score(labels, scores)
    ap = average_precision_score(labels, scores)
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    f1max = np.max(f1[np.isfinite(f1)])
    return {"auroc": nan_to_none(auroc), "ap": nan_to_none(ap), "f1max": nan_to_none(f1max)}


def authors_pro(masks, amaps, max_step=200):
    """The authors' compute_pro (as described in the MetaUAS evaluation code)."""
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    if delta == 0:
        return None  # np.arange(min, max, 0) raises ZeroDivisionError
    pros_all, fprs = [], []
    inverse = 1 - masks
    regions = [measure.regionprops(measure.label(m, connectivity=2)) for m in masks]
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        pros = []
        for b, regs in zip(binary, regions):
            for region in regs:
                c = region.coords
                pros.append(b[c[:, 0], c[:, 1]].sum() / region.area)
        with np.errstate(divide="ignore", invalid="ignore"):
            fpr = np.logical_and(inverse, binary).sum() / inverse.sum()
        pros_all.append(np.mean(pros) if pros else float("nan"))
        fprs.append(fpr)
    pros_all, fprs = np.array(pros_all), np.array(fprs)
    keep = fprs < 0.3
    pros_all, fprs = pros_all[keep], fprs[keep]
    if len(fprs) < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        fprs = fprs / fprs.max()
    try:
        v = auc(fprs, pros_all)
    except ValueError:
        return None
    return nan_to_none(v)


def region_areas(masks):
    out = []
    for m in masks:
        out.append(sorted(int(r.area) for r in measure.regionprops(measure.label(m, connectivity=2))))
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


def pro_cases(rng):
    cases = []

    def add(name, maps, masks):
        maps = np.asarray(maps, dtype=np.float32)
        masks = np.asarray(masks, dtype=np.uint8)
        n, h, w = maps.shape
        cases.append({"name": name, "n": n, "height": h, "width": w,
                      "maps": f32_list(maps), "masks": [int(v) for v in masks.ravel()],
                      "region_areas": region_areas(masks),
                      "aupro": authors_pro(masks, maps)})

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


def class_cases(rng):
    """The full per-class computation: f32 min-max normalization over the class, image score
    = max of the normalized map, the seven metrics (AUROC < 0.5 replaced by 1 - AUROC)."""
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
        raw = raw.astype(np.float32)
        norm = (raw - raw.min()) / (raw.max() - raw.min())
        assert norm.dtype == np.float32
        scores = norm.reshape(n, -1).max(axis=1)
        img = ranking(scores, labels)
        pix = ranking(norm.ravel(), masks.ravel())
        flipv = lambda v: v if v is None or v >= 0.5 else 1 - v
        cases.append({
            "name": f"class_{i}", "n": n, "height": h, "width": w,
            "raw_maps": f32_list(raw), "masks": [int(v) for v in masks.ravel()],
            "labels": [int(v) for v in labels],
            "metrics": {
                "I-AUROC": flipv(img["auroc"]), "I-AP": img["ap"], "I-F1max": img["f1max"],
                "P-AUROC": flipv(pix["auroc"]), "P-AP": pix["ap"], "P-F1max": pix["f1max"],
                "P-AUPRO": authors_pro(masks, norm),
            },
            "raw_auroc": {"I-AUROC": img["auroc"], "P-AUROC": pix["auroc"]},
        })
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/metrics")
    args = ap.parse_args()
    rng = np.random.default_rng(20240613)
    doc = {
        "generator": "tools/reference/make_metric_fixtures.py",
        "versions": {"numpy": np.__version__, "scikit-learn": sklearn.__version__,
                     "scikit-image": skimage.__version__},
        "ranking": ranking_cases(rng),
        "pro": pro_cases(rng),
        "class": class_cases(rng),
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
        print("pro", c["name"], c["n"], c["region_areas"], c["aupro"])
    for c in doc["class"]:
        print("class", c["name"], c["metrics"], c["raw_auroc"])


if __name__ == "__main__":
    main()
