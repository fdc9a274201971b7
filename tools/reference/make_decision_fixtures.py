"""Reference values for the decision layer (`metauas::model::decision`), from independent
libraries: OpenCV for frame-size maps, scipy.ndimage for regions, numpy for calibration
statistics, scikit-learn for F1-optimal thresholds.

Writes tests/fixtures/decision/decision.json; `tests/decision.rs` checks the Rust code
against it. Run:

    /opt/refenv/bin/python tools/reference/make_decision_fixtures.py --out tests/fixtures/decision

Conventions recorded here:
- resize: `cv2.resize(map, (width, height), interpolation=cv2.INTER_LINEAR)` on float32.
- regions: `scipy.ndimage.label(mask, structure=np.ones((3, 3)))` (8-connectivity) of
  `(map >= t) & roi`; per label its `find_objects` box, pixel count, `maximum`, `mean` and
  unweighted `center_of_mass`. The frame box of a region is
  `[floor(x0 * W / side), floor(y0 * H / side), ceil(x1 * W / side), ceil(y1 * H / side))`.
- statistics: numpy float64 `mean`, `std` (ddof=0), `quantile` (method linear) of the
  float32 values converted to float64.
- F1-optimal: `precision_recall_curve`, `f1 = 2 p r / (p + r)` (NaN skipped), the
  threshold at `argmax` (the lowest threshold of a tie).
"""

import argparse
import json
import math
import os

import cv2
import numpy as np
import scipy
from scipy import ndimage
import sklearn
from sklearn.metrics import precision_recall_curve

QUANTILES = [0.5, 0.9, 0.95, 0.99, 0.995, 0.999]


def f32list(a):
    return [float(v) for v in np.asarray(a, dtype=np.float32).ravel()]


def smooth_map(rng, side, blobs):
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    m = rng.random((side, side)) * 0.2
    for _ in range(blobs):
        cy, cx = rng.random(2) * side
        r = 1 + rng.random() * side / 8
        m += rng.random() * 0.8 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return np.clip(m, 0, 1).astype(np.float32)


def resize_cases(rng):
    cases = []
    for side, w, h in [(16, 37, 23), (16, 7, 5), (24, 101, 67), (8, 3, 19), (5, 5, 5),
                       (12, 24, 24), (12, 6, 6), (32, 300, 20), (1, 4, 3)]:
        m = rng.random((side, side)).astype(np.float32)
        out = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
        cases.append({"side": side, "width": w, "height": h, "map": f32list(m),
                      "want": f32list(out)})
    return cases


def region_cases(rng):
    cases = []
    for i, (side, t, frame, use_roi) in enumerate([(32, 0.5, (900, 700), False),
                                                  (32, 0.35, (333, 217), True),
                                                  (40, 0.6, (40, 40), False),
                                                  (24, 0.2, (1024, 768), True)]):
        m = smooth_map(rng, side, 6)
        roi = np.ones((side, side), dtype=bool)
        if use_roi:
            yy, xx = np.mgrid[0:side, 0:side]
            roi = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side * 0.42) ** 2
        mask = (m.astype(np.float64) >= t) & roi
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        idx = np.arange(1, count + 1)
        objects = ndimage.find_objects(labels)
        maxima = ndimage.maximum(m, labels, idx) if count else []
        means = ndimage.mean(m.astype(np.float64), labels, idx) if count else []
        areas = ndimage.sum(np.ones_like(m), labels, idx) if count else []
        centers = ndimage.center_of_mass(mask, labels, idx) if count else []
        W, H = frame
        regions = []
        for k in range(count):
            sy, sx = objects[k]
            x0, x1, y0, y1 = sx.start, sx.stop, sy.start, sy.stop
            regions.append({
                "label": k + 1,
                "map_box": [x0, y0, x1, y1],
                "box": [x0 * W // side, y0 * H // side, -(-x1 * W // side), -(-y1 * H // side)],
                "area": int(areas[k]), "max": float(maxima[k]), "mean": float(means[k]),
                "map_centroid": [float(centers[k][1]), float(centers[k][0])],
            })
        cases.append({"side": side, "threshold": t, "frame": list(frame), "map": f32list(m),
                      "roi": [int(v) for v in roi.ravel()] if use_roi else None,
                      "inspected": int(roi.sum()), "labels": [int(v) for v in labels.ravel()],
                      "regions": regions})
    return cases


def numpy_stats(values):
    v = values.astype(np.float64)
    return {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max()),
            "quantiles": {str(q): float(np.quantile(v, q)) for q in QUANTILES}}


def stats_cases(rng):
    cases = []
    for n in [1, 2, 7, 1000, 4001]:
        values = rng.beta(2, 5, size=n).astype(np.float32)
        if n > 7:
            values[rng.integers(0, n, size=n // 10)] = values[0]  # ties
        v = values.astype(np.float64)
        cases.append({"values": f32list(values), "stats": numpy_stats(values),
                      "rules": {"max": float(v.max()), "quantile:0.99": float(np.quantile(v, 0.99)),
                                "quantile:0.25": float(np.quantile(v, 0.25)),
                                "sigma:3": float(v.mean() + 3 * v.std()),
                                "sigma:-1.5": float(v.mean() - 1.5 * v.std())}})
    return cases


def f1_cases(rng):
    cases = []
    for n, p, levels in [(50, 0.3, 0), (400, 0.1, 20), (1500, 0.5, 7), (10, 0.2, 3)]:
        labels = (rng.random(n) < p).astype(np.uint8)
        labels[0] = 1
        scores = rng.random(n) + labels * 0.4
        if levels:
            scores = np.round(scores * levels) / levels
        scores = scores.astype(np.float32)
        prec, rec, thr = precision_recall_curve(labels, scores)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * prec * rec / (prec + rec)
        f1 = f1[:-1]
        f1 = np.where(np.isnan(f1), -1.0, f1)
        best = int(np.argmax(f1))
        cases.append({"scores": f32list(scores), "labels": [int(v) for v in labels],
                      "threshold": float(thr[best]), "f1": float(f1[best])})
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/decision")
    args = ap.parse_args()
    rng = np.random.default_rng(20261202)
    fixture = {
        "versions": {"numpy": np.__version__, "opencv": cv2.__version__,
                     "scipy": scipy.__version__, "sklearn": sklearn.__version__},
        "resize": resize_cases(rng), "regions": region_cases(rng),
        "stats": stats_cases(rng), "f1": f1_cases(rng),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decision.json")
    with open(path, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
