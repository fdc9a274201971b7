"""Time PyTorch (the reference model, float32, eager, CPU) against `metauas bench` in one run.

Rounds alternate: metauas (K iterations in its own process), then PyTorch (K iterations),
and so on, so both see the same machine state. Prints the medians and the ratio.

    /opt/refenv/bin/python tools/bench_torch.py --size 256 --rounds 3 --iters 10

Needs the reference environment of tools/reference/README.md and a release build
(`cargo build --release`). Weights are the synthetic ones of docs/SYNTHETIC.md (seed 1, all
gains 1), the same that `metauas bench` uses; time does not depend on the values.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))

import metauas_ref  # noqa: E402
import synth  # noqa: E402


def torch_model():
    recipe = dict(seed=1, gain_encoder=1.0, gain_alignment=1.0, gain_decoder=1.0, gain_head=1.0)
    return metauas_ref.model_with_weights(synth.state_dict(recipe), torch.float32)


def torch_times(model, size: int, iters: int) -> list:
    prompt = metauas_ref.preprocess(synth.image(1, size, size), size, torch.float32)
    query = metauas_ref.preprocess(synth.image(2, size, size, (size // 3, size // 3, size // 8)), size, torch.float32)
    times = []
    with torch.no_grad():
        for i in range(iters + 1):
            t = time.perf_counter()
            model(query, prompt)
            if i > 0:
                times.append((time.perf_counter() - t) * 1e3)
    return times


def metauas_run(binary: str, size: int, iters: int) -> dict:
    out = subprocess.run(
        [binary, "bench", "--backend", "cpu", "--size", str(size), "--iters", str(iters), "--json"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=os.path.join(HERE, "..", "target", "release", "metauas"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = torch_model()
    ours_full, ours_cached, theirs = [], [], []
    for r in range(args.rounds):
        m = metauas_run(args.binary, args.size, args.iters)
        ours_full.append(m["full_ms"])
        ours_cached.append(m["cached_ms"])
        t = torch_times(model, args.size, args.iters)
        theirs.extend(t)
        print(f"round {r}: metauas full {m['full_ms']:.1f} ms, cached {m['cached_ms']:.1f} ms; "
              f"PyTorch full {statistics.median(t):.1f} ms", flush=True)
    of, oc, tf = statistics.median(ours_full), statistics.median(ours_cached), statistics.median(theirs)
    print(f"size {args.size}, {args.threads} threads, torch {torch.__version__}")
    print(f"| engine | full forward median (ms) | ratio vs PyTorch |")
    print(f"|---|---|---|")
    print(f"| PyTorch eager f32 | {tf:.1f} | 1.00x |")
    print(f"| metauas full | {of:.1f} | {tf / of:.2f}x faster |")
    print(f"| metauas cached prompt | {oc:.1f} | {tf / oc:.2f}x faster |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
