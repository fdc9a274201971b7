"""Reference bundle from the PyTorch reference model (or ONNX Runtime running its export).

Writes the same bundle `metauas segment --taps` writes: every named intermediate tensor of
one prompt/query pair as `.npy` (NCHW; float32, or float64 with --float64) named after the
PyTorch module that produces it, captured with forward hooks, plus `manifest.json`. Then

    metauas compare OUR_BUNDLE THIS_BUNDLE

shows the first tensor where two engines part. Usage:

    python tools/reference/export_taps.py --weights W --prompt P --query Q --size 256 --out DIR
        [--float64] [--engine torch|onnxruntime]

`--engine onnxruntime` exports the graph `tools/bench_peers.py` benchmarks (opset 17,
TorchScript exporter), with every tap added as a graph output, and runs it on ONNX Runtime's
CPU provider: a third engine for `metauas compare`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metauas_ref as ref  # noqa: E402

FORMAT, VERSION = "metauas-taps", 1
DECODER_SKIP = [b[1] > 0 for b in ref.DECODER_BLOCKS]


def projection(level: int) -> str:
    return f"alignment.{level}.alignment_layer.dimensionality_reduction"


def encoder_taps(call: str) -> list:
    """(name, module, call) of one image's encoder taps."""
    taps = [(f"{call}.input", "encoder._conv_stem:input", call), (f"{call}.encoder._swish", "encoder._swish", call)]
    taps += [(f"{call}.encoder._blocks.{b}", f"encoder._blocks.{b}", call) for b in ref.STAGE_LAST_BLOCK]
    return taps


def tap_list() -> list:
    """Every tap in metauas's graph order: the prompt half, then the query half."""
    taps = encoder_taps("prompt") + [(f"prompt.{projection(i)}", projection(i), "prompt") for i in range(3)]
    taps += encoder_taps("query")
    for i in range(3):
        taps += [(f"query.{projection(i)}", projection(i), "query"), (f"alignment.{i}", f"alignment.{i}", None)]
    for b, skip in enumerate(DECODER_SKIP):
        parts = ["conv1", "conv2"] if skip else ["conv1"]  # block 4's conv2 is its output
        taps += [(f"decoder.blocks.{b}.{p}", f"decoder.blocks.{b}.{p}", None) for p in parts]
        taps.append((f"decoder.blocks.{b}", f"decoder.blocks.{b}", None))
    return taps + [("mask_head", "mask_head", None), ("map", "sigmoid(mask_head)", None)]


class Capture:
    """Forward hooks that store each tap. Modules run for both images (the encoder, the
    projections) are called for the query first, then the prompt (`MetaUAS.forward` encodes
    the query first; `SoftAlignment` projects fq before fp)."""

    def __init__(self, model: torch.nn.Module):
        self.tensors: dict = {}
        self.handles = []
        modules = dict(model.named_modules())
        by_module: dict = {}
        for name, module, call in tap_list():
            if name != "map":
                by_module.setdefault(module, []).append((name, call))
        for module, names in by_module.items():
            path, _, what = module.partition(":")
            self.handles.append(self._hook(modules[path], names, pre=(what == "input")))

    def _hook(self, module, names, pre: bool):
        order = {n for n, c in names if c is None} or None
        calls = {"query": None, "prompt": None}
        for n, c in names:
            if c is not None:
                calls[c] = n
        seen = {"count": 0}

        def store(value):
            if order:  # a module run once
                self.tensors[next(iter(order))] = value
                return
            call = ("query", "prompt")[seen["count"]] if seen["count"] < 2 else None
            seen["count"] += 1
            if call and calls[call]:
                self.tensors[calls[call]] = value

        if pre:
            return module.register_forward_pre_hook(lambda m, inp: store(inp[0]))
        return module.register_forward_hook(lambda m, inp, out: store(out))

    def remove(self):
        for h in self.handles:
            h.remove()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(out: str, tensors: dict, head: dict, dtype) -> int:
    """Every tap as .npy in a staging folder, then one rename onto `out`."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    entries, total = [], 0
    for name, module, call in tap_list():
        arr = np.ascontiguousarray(tensors[name].detach().cpu().numpy().astype(dtype))
        if arr.ndim != 4 or arr.shape[0] != 1:
            raise SystemExit(f"{name}: expected shape (1, C, H, W), got {arr.shape}")
        path = os.path.join(staging, f"{name}.npy")
        np.save(path, arr)
        size = os.path.getsize(path)
        total += size
        entries.append(dict(name=name, module=module, call=call, shape=list(arr.shape),
                            dtype=np.dtype(dtype).name, layout="NCHW", file=f"{name}.npy", bytes=size))
    manifest = dict(format=FORMAT, version=VERSION, **head, tensors=entries)
    with open(os.path.join(staging, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    old = os.path.join(parent, f".{os.path.basename(out)}.{os.getpid()}.old")
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return total


def run_torch(model, query, prompt) -> dict:
    cap = Capture(model)
    try:
        with torch.no_grad():
            out = model(query, prompt)
    finally:
        cap.remove()
    cap.tensors["map"] = out
    return cap.tensors


class WithTaps(torch.nn.Module):
    """The model with every tap as an output (for the ONNX export)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, query, prompt):
        cap = Capture(self.model)
        try:
            out = self.model(query, prompt)
        finally:
            cap.remove()
        cap.tensors["map"] = out
        # Inputs are graph inputs, not outputs: an identity makes them outputs too.
        for call in ("query", "prompt"):
            cap.tensors[f"{call}.input"] = cap.tensors[f"{call}.input"] * 1.0
        return tuple(cap.tensors[n] for n, _, _ in tap_list())


def run_onnxruntime(model, query, prompt, workdir: str, threads: int) -> tuple:
    import onnxruntime as ort

    names = [n for n, _, _ in tap_list()]
    path = os.path.join(workdir, f"metauas_taps_{query.shape[-1]}.onnx")
    with torch.no_grad():
        torch.onnx.export(WithTaps(model), (query, prompt), path, opset_version=17,
                          input_names=["query", "prompt"], output_names=names, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    outs = sess.run(names, {"query": query.numpy(), "prompt": prompt.numpy()})
    return {n: torch.from_numpy(o) for n, o in zip(names, outs)}, f"ONNX Runtime {ort.__version__} (CPU)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help=".safetensors or torch state_dict (.ckpt)")
    ap.add_argument("--prompt", required=True, help="normal (prompt) image")
    ap.add_argument("--query", required=True, help="query image")
    ap.add_argument("--size", type=int, default=256, help="input side, multiple of 32")
    ap.add_argument("--out", required=True, help="bundle folder to write")
    ap.add_argument("--float64", action="store_true", help="compute and store in float64 (the truth)")
    ap.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.size <= 0 or args.size % 32 != 0:
        ap.error("--size must be a positive multiple of 32")
    if args.float64 and args.engine == "onnxruntime":
        ap.error("--float64 runs on the torch engine only")
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    model = ref.model_with_weights(ref.load_state_dict_file(args.weights), dtype)
    images = {k: ref.load_image(getattr(args, k)) for k in ("prompt", "query")}
    query = ref.preprocess(images["query"], args.size, dtype)
    prompt = ref.preprocess(images["prompt"], args.size, dtype)
    if args.engine == "torch":
        tensors = run_torch(model, query, prompt)
        producer = f"PyTorch {torch.__version__} (tools/reference/export_taps.py)"
        backend = f"torch cpu, {args.threads} threads"
    else:
        tensors, producer = run_onnxruntime(model, query, prompt, os.path.dirname(os.path.abspath(args.out)),
                                            args.threads)
        backend = "onnxruntime CPUExecutionProvider"
    head = dict(
        producer=producer,
        backend=backend,
        precision="f64" if args.float64 else "f32",
        size=args.size,
        weights=dict(file=args.weights, sha256=sha256(args.weights)),
        inputs={k: dict(file=getattr(args, k), sha256=sha256(getattr(args, k)),
                        width=int(images[k].shape[1]), height=int(images[k].shape[0])) for k in ("prompt", "query")},
    )
    total = write_bundle(args.out, tensors, head, np.float64 if args.float64 else np.float32)
    print(f"wrote {args.out}: {len(tap_list())} tensors, {total / 1e6:.1f} MB ({producer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
