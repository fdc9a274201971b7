"""PyTorch eager on the GPU, as tools/gpu_bench.sh needs it: the reference model
(tools/reference/metauas_ref.py) on `cuda`, float32, batch 1 and 16, 256 and 512, cached
query (the prompt's encoder output reused: the query encoder, alignment and decoder) and
full forward (both encoders), timed with CUDA events after a warm-up; median and p90 of
--iters runs, with PyTorch's defaults (cuDNN may use TF32) and with TF32 off. Prints one
JSON line per case.

    python3 tools/torch_gpu_bench.py --iters 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))

import metauas_ref  # noqa: E402
import synth  # noqa: E402

RECIPE = dict(seed=1, gain_encoder=1.0, gain_alignment=1.0, gain_decoder=1.0, gain_head=1.0)


def cached_forward(model, query, fp):
    """The query half with the prompt's features given (what metauas caches in a bank)."""
    fq = model.encode(query)
    fused = [align(fq[4 - i], fp[4 - i]) for i, align in enumerate(model.alignment)]
    x, skips = fused[0], [fused[1], fused[2], fq[1], fq[0], None]
    for block, skip in zip(model.decoder.blocks, skips):
        x = block(x, skip)
    return torch.sigmoid(model.mask_head(x))


def timed(fn, iters: int) -> list:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = metauas_ref.model_with_weights(synth.state_dict(RECIPE), torch.float32).to(dev)
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for size in map(int, args.sizes.split(",")):
            prompt = metauas_ref.preprocess(synth.image(1, size, size), size, torch.float32).to(dev)
            query1 = metauas_ref.preprocess(synth.image(2, size, size, (size // 3, size // 3, size // 8)), size,
                                            torch.float32).to(dev)
            with torch.no_grad():
                fp1 = model.encode(prompt)
                for batch in map(int, args.batches.split(",")):
                    query = query1.expand(batch, -1, -1, -1).contiguous()
                    pr = prompt.expand(batch, -1, -1, -1).contiguous()
                    fp = [f.expand(batch, -1, -1, -1).contiguous() for f in fp1]
                    cases = {"cached": lambda: cached_forward(model, query, fp), "full": lambda: model(query, pr)}
                    for name, fn in cases.items():
                        t = sorted(timed(fn, args.iters))
                        med = statistics.median(t)
                        print(json.dumps(dict(engine="pytorch-eager", case=name, size=size, batch=batch, tf32=tf32,
                                              median_ms=med, p90_ms=t[int(0.9 * (len(t) - 1))],
                                              images_per_s=batch / (med * 1e-3), gpu=torch.cuda.get_device_name())),
                              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
