"""metauas against its peers on the CPU, in one run: ONNX Runtime (CPU EP) and PyTorch eager.

    /opt/refenv/bin/python tools/bench_peers.py --sizes 256 512 --rounds 3 --iters 10

The reference model of tools/reference (synthetic weights of docs/SYNTHETIC.md, seed 1, all
gains 1: the same that `metauas bench` uses; time does not depend on the values) is exported
to ONNX (opset 17) once per size. Then rounds alternate engines (metauas, ONNX Runtime,
PyTorch, metauas, ...); each engine runs in its own process, so its peak RSS is its own.
Every engine uses the same number of threads (default 2). Reported: median full forward
(prompt + query) over all rounds, metauas's cached-prompt query, the ratios, peak RSS.

Needs the environment of tools/reference/README.md plus `onnxruntime` and `onnx`, and a
release build (`cargo build --release`).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))
RECIPE = dict(seed=1, gain_encoder=1.0, gain_alignment=1.0, gain_decoder=1.0, gain_head=1.0)


def inputs(size: int):
    import torch

    import metauas_ref
    import synth

    prompt = metauas_ref.preprocess(synth.image(1, size, size), size, torch.float32)
    defect = (size // 3, size // 3, size // 8)
    query = metauas_ref.preprocess(synth.image(2, size, size, defect), size, torch.float32)
    return query, prompt


def model():
    import torch

    import metauas_ref
    import synth

    return metauas_ref.model_with_weights(synth.state_dict(RECIPE), torch.float32)


def export_onnx(size: int, path: str) -> None:
    import torch

    query, prompt = inputs(size)
    with torch.no_grad():
        torch.onnx.export(model(), (query, prompt), path, opset_version=17,
                          input_names=["query", "prompt"], output_names=["map"], dynamo=False)


def timed(fn, iters: int) -> list:
    fn()  # warm-up
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def worker(engine: str, size: int, iters: int, threads: int, onnx_path: str) -> None:
    """Runs in a child process: times one engine, prints one JSON line."""
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        # Inputs saved by the parent: importing torch here would inflate ORT's peak RSS.
        import numpy as np

        q, p = (np.load(onnx_path + f".{name}.npy") for name in ("query", "prompt"))
        times = timed(lambda: sess.run(None, {"query": q, "prompt": p}), iters)
    else:
        import torch

        torch.set_num_threads(threads)
        m = model()
        q, p = inputs(size)
        with torch.no_grad():
            times = timed(lambda: m(q, p), iters)
    print(json.dumps({"times": times, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """VmHWM of this process. (ru_maxrss is not used: Linux carries it over from the parent
    across exec, so every child would report the exporting parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's name and whether it has AVX-512: the tables of two machines differ by it."""
    name, flags = "unknown CPU", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}, {os.cpu_count()} logical CPUs)"


def run_child(args: list) -> dict:
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(size: int, a) -> dict:
    onnx_path = os.path.join(a.workdir, f"metauas_{size}.onnx")
    if not os.path.exists(onnx_path):
        print(f"exporting ONNX for {size} -> {onnx_path}", file=sys.stderr, flush=True)
        export_onnx(size, onnx_path)
        import numpy as np

        for name, t in zip(("query", "prompt"), inputs(size)):
            np.save(onnx_path + f".{name}.npy", t.numpy())
    me = [sys.executable, os.path.abspath(__file__), "--worker"]
    common = ["--size", str(size), "--iters", str(a.iters), "--threads", str(a.threads), "--onnx", onnx_path]
    res = {"ours_full": [], "ours_cached": [], "ort": [], "torch": [], "rss": {}}
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    for r in range(a.rounds):
        out = subprocess.run([a.binary, "bench", "--backend", "cpu", "--size", str(size), "--iters", str(a.iters), "--json"],
                             check=True, capture_output=True, text=True, env=env)
        m = json.loads(out.stdout)
        res["ours_full"].append(m["full_ms"])
        res["ours_cached"].append(m["cached_ms"])
        res["device"] = m["device"]
        res["rss"]["metauas"] = max(res["rss"].get("metauas", 0), m["peak_rss_mb"])
        for eng in ["ort", "torch"]:
            c = run_child(me + [eng] + common)
            res[eng].extend(c["times"])
            res["rss"][eng] = max(res["rss"].get(eng, 0), c["peak_rss_mb"])
        print(f"size {size} round {r}: metauas full {m['full_ms']:.1f} cached {m['cached_ms']:.1f} | "
              f"ORT {statistics.median(res['ort'][-a.iters:]):.1f} | "
              f"PyTorch {statistics.median(res['torch'][-a.iters:]):.1f} ms", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--binary", default=os.path.join(HERE, "..", "target", "release", "metauas"))
    ap.add_argument("--workdir", default=os.path.join(HERE, "..", "target", "peers"))
    ap.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], a.size, a.iters, a.threads, a.onnx)
        return 0
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    for size in a.sizes:
        r = bench_size(size, a)
        of, oc = statistics.median(r["ours_full"]), statistics.median(r["ours_cached"])
        ort, pt = statistics.median(r["ort"]), statistics.median(r["torch"])
        rows.append((size, of, oc, ort, pt, r["rss"]))
        device = r["device"]
    print(f"\n{cpu_model()}; metauas on {device}")
    print(f"{a.threads} threads, {a.rounds} rounds x {a.iters} iterations, medians in ms")
    print("| size | metauas full | metauas cached | ONNX Runtime | PyTorch | full vs ORT | cached vs ORT "
          "| full vs PyTorch | peak RSS MB (ours / ORT / PyTorch) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, of, oc, ort, pt, rss in rows:
        print(f"| {size} | {of:.1f} | {oc:.1f} | {ort:.1f} | {pt:.1f} | {ort / of:.2f}x | {ort / oc:.2f}x "
              f"| {pt / of:.2f}x | {rss['metauas']:.0f} / {rss['ort']:.0f} / {rss['torch']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
