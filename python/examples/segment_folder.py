"""Segment every image of a folder against one normal image; save each map as .npy and
print one line per query. Without --weights, synthetic weights (the maps mean nothing).

    python python/examples/segment_folder.py --prompt good.png --queries frames/ [--weights metauas-256.ckpt]
"""

import argparse
from pathlib import Path

import numpy as np

import metauas

IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default="metauas-py-out")
    args = ap.parse_args()
    engine = (metauas.Engine(args.weights, size=args.size) if args.weights
              else metauas.Engine.synthetic(args.size))
    prompt = engine.encode_prompt(args.prompt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(args.queries).iterdir()):
        if path.suffix.lower() not in IMAGES:
            continue
        try:
            result = engine.segment(prompt, path)
        except metauas.Error as e:
            print(f"{path}: {e}")
            continue
        np.save(out / f"{path.stem}.npy", result.map)
        print(f"{path.name}: score {result.score:.4f}, frame {result.frame}")


if __name__ == "__main__":
    main()
