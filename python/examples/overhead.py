"""The cost of a Python call against the Rust API, for a query with a cached prompt at 256
(CPU, synthetic weights): `metauas bench --json` (the Rust API, `Engine::segment`) and
`engine.segment(prompt, array)` from Python, interleaved, medians over the rounds.

    python python/examples/overhead.py [--rounds 5 --iters 20]
"""

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import metauas

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("METAUAS_BIN", ROOT / "target" / "release" / "metauas"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    engine = metauas.Engine.synthetic(args.size, seed=1, backend="cpu")
    rng = np.random.default_rng(2)
    prompt = engine.encode_prompt(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    query = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    for _ in range(3):
        engine.segment(prompt, query)
    rust, python, inside, calls = [], [], [], []
    for r in range(args.rounds):
        out = subprocess.run([str(BIN), "bench", "--size", str(args.size), "--backend", "cpu",
                              "--iters", str(args.iters), "--json"], capture_output=True, text=True, check=True)
        rust.append(json.loads(out.stdout.strip().splitlines()[-1])["cached_ms"])
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            engine.segment(prompt, query)
            times.append((time.perf_counter() - t) * 1e3)
        python.append(statistics.median(times))
        # The same call, timed inside Rust too: the Python layer's share of this very call.
        for _ in range(args.iters):
            t = time.perf_counter()
            _, rust_ms = engine._segment_timed(prompt, query)
            calls.append((time.perf_counter() - t) * 1e3)
            inside.append(rust_ms)
        print(f"round {r}: Rust API (bench) {rust[-1]:.2f} ms, Python {python[-1]:.2f} ms")
    rm, pm = statistics.median(rust), statistics.median(python)
    layer = statistics.median(c - i for c, i in zip(calls, inside))
    print(json.dumps({"size": args.size, "rust_bench_cached_ms": round(rm, 2),
                      "python_cached_ms": round(pm, 2),
                      "vs_bench_percent": round(100 * (pm - rm) / rm, 2),
                      "python_layer_ms": round(layer, 4),
                      "python_layer_percent": round(100 * layer / statistics.median(inside), 3)}))


if __name__ == "__main__":
    main()
