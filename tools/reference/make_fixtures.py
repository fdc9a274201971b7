"""Conformance fixtures for the metauas engine.

For each input size and weight recipe this builds the synthetic weights and images of
docs/SYNTHETIC.md, runs the PyTorch reference twice -- in float64 (the truth: float32
weights widened, every op including the resize in float64) and in float32 (the usual
PyTorch path) -- and stores sampled values of the query-side taps plus PyTorch-float32's
own error against the truth. Run:

    python tools/reference/make_fixtures.py --out tests/fixtures/conformance
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metauas_ref as ref  # noqa: E402
import synth  # noqa: E402

SIZES = (256, 512)
SEED = 7
RECIPES = {
    # Soft alignment: the softmax spreads weight over many prompt positions.
    "smooth": dict(seed=SEED, gain_encoder=1.0, gain_alignment=14.0, gain_decoder=1.5, gain_head=4.0),
    # Sharp alignment: nearly one-hot softmax, as with trained weights.
    "sharp": dict(seed=SEED, gain_encoder=1.0, gain_alignment=384.0, gain_decoder=1.5, gain_head=4.0),
}
PROMPT = dict(seed=1, width=300, height=220, defect=None)
QUERY = dict(seed=2, width=280, height=240, defect=[150, 60, 48])
TAPS = [f"f{i}" for i in range(1, 6)] + ["fused5", "fused4", "fused3"] + [f"dec{b}" for b in range(5)] + ["map"]
SAMPLES_INTERMEDIATE = 2048
SAMPLES_MAP = 16384
MAX_TOTAL_BYTES = 5 * 1024 * 1024
# Real-photo cases: prompt and query are JPEG files of the image corpus (tests/fixtures/images,
# written by make_image_fixtures.py), decoded by Pillow as the authors' loader does. A
# non-square 4:2:0 prompt and a camera-sized 1024x768 query. Fewer taps are kept: the
# encoder's first and last stages, the finest alignment, the last decoder block and the map.
IMAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "images")
JPEG_PROMPT = "pil_420_333x217.jpg"
JPEG_QUERY = "pil_frame_1024x768.jpg"
JPEG_CASES = ((256, "smooth"), (512, "sharp"))
JPEG_TAPS = ["f1", "f5", "fused3", "dec4", "map"]


def synth_image(desc: dict) -> np.ndarray:
    defect = tuple(desc["defect"]) if desc["defect"] is not None else None
    return synth.image(desc["seed"], desc["width"], desc["height"], defect)


SYNTH_CHECK_ENTRIES = (
    "encoder._conv_stem.weight",
    "encoder._bn0.running_var",
    "encoder._blocks.31._se_reduce.bias",
    "encoder._blocks.31._bn2.weight",
    "alignment.2.alignment_layer.dimensionality_reduction.weight",
    "decoder.blocks.0.conv1.0.weight",
    "decoder.blocks.4.conv2.1.running_mean",
    "mask_head.weight",
    "mask_head.bias",
)


def synth_check(state: dict, prompt_u8: np.ndarray, query_u8: np.ndarray) -> dict:
    """Cheap fingerprints of the synthetic inputs, so the Rust side can confirm it rebuilt them."""
    floats = [v for v in state.values() if v.dtype == np.float32]
    bits_sum = sum(int(v.view(np.uint32).astype(np.uint64).sum()) for v in floats)
    entries = {}
    for name in SYNTH_CHECK_ENTRIES:
        flat = state[name].reshape(-1).view(np.uint32)
        entries[name] = [int(flat[0]), int(flat[-1])]
    return {
        "f32_bits_sum": bits_sum,
        "float_entries": len(floats),
        "entry_first_last_bits": entries,
        "prompt_fnv1a64": f"{synth.fnv1a64(prompt_u8.tobytes()):016x}",
        "query_fnv1a64": f"{synth.fnv1a64(query_u8.tobytes()):016x}",
    }


def sample_indices(numel: int, count: int, key: str) -> np.ndarray:
    """Sorted unique flat indices, reproducible from `key` (all of them if numel <= count)."""
    if numel <= count:
        return np.arange(numel, dtype=np.int64)
    rng = np.random.default_rng(synth.fnv1a64(key.encode("utf-8")))
    return np.sort(rng.choice(numel, size=count, replace=False)).astype(np.int64)


# ---------------------------------------------------------------- cross-checks (float64)
def naive_alignment(proj_w: np.ndarray, proj_b: np.ndarray, fq: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Spec section 3 written out with numpy; fq, fp are (C, H, W) float64."""
    c, h, w = fq.shape
    wq = proj_w.reshape(proj_w.shape[0], c)
    q = wq @ fq.reshape(c, -1) + proj_b[:, None]
    k = wq @ fp.reshape(c, -1) + proj_b[:, None]
    logits = q.T @ k  # (Nq, Np), unscaled
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    wts = e / e.sum(axis=1, keepdims=True)
    aligned = fp.reshape(c, -1) @ wts.T  # V = raw prompt features
    return np.concatenate([fq, aligned.reshape(c, h, w)], axis=0)


def literal_alignment_at(proj_w, proj_b, fq, fp, i: int) -> np.ndarray:
    """Aligned vector for one query position with explicit sums (no matrix products)."""
    c = fq.shape[0]
    wq = proj_w.reshape(proj_w.shape[0], c)
    fq2, fp2 = fq.reshape(c, -1), fp.reshape(c, -1)
    qi = [sum(wq[o, ch] * fq2[ch, i] for ch in range(c)) + proj_b[o] for o in range(wq.shape[0])]
    kk = wq @ fp2 + proj_b[:, None]
    logits = [sum(qi[o] * kk[o, j] for o in range(wq.shape[0])) for j in range(fp2.shape[1])]
    m = max(logits)
    e = [np.exp(a - m) for a in logits]
    z = sum(e)
    return np.array([sum(e[j] / z * fp2[ch, j] for j in range(fp2.shape[1])) for ch in range(c)])


def check_alignment(model, query64, prompt64, taps64) -> float:
    """Assert the model's fused taps equal the naive formula; returns the max relative error."""
    with torch.no_grad():
        fp = model.encode(prompt64)
    worst = 0.0
    for i, tap in enumerate(("fused5", "fused4", "fused3")):
        lvl = 4 - i
        conv = model.alignment[i].alignment_layer.dimensionality_reduction
        w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
        fq_np, fp_np = taps64[f"f{lvl + 1}"][0].numpy(), fp[lvl][0].numpy()
        want = naive_alignment(w, b, fq_np, fp_np)
        got = taps64[tap][0].numpy()
        rel = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))
        assert rel < 1e-10, f"{tap}: alignment differs from the naive formula (rel {rel:.3g})"
        c = fq_np.shape[0]
        n = fq_np.shape[1] * fq_np.shape[2]
        for pos in (0, n // 2, n - 1):
            lit = literal_alignment_at(w, b, fq_np, fp_np, pos) if n <= 1024 else None
            if lit is not None:
                got_pos = got[c:].reshape(c, -1)[:, pos]
                r = float(np.abs(got_pos - lit).max() / max(np.abs(lit).max(), 1e-300))
                assert r < 1e-10, f"{tap}: position {pos} differs from the literal sums (rel {r:.3g})"
                worst = max(worst, r)
        worst = max(worst, rel)
    return worst


def check_decoder_shapes(model, size: int, taps64) -> None:
    """Decoder block inputs/outputs against the spec table (section 4)."""
    seen = {}
    hooks = [
        blk.conv1[0].register_forward_pre_hook(lambda mod, inp, b=b: seen.__setitem__(b, tuple(inp[0].shape)))
        for b, blk in enumerate(model.decoder.blocks)
    ]
    spec = [(1216, 256), (368, 128), (160, 64), (112, 64), (64, 48)]
    try:
        head = taps64["fused5"]
        x = head
        skips = [taps64["fused4"], taps64["fused3"], taps64["f2"], taps64["f1"], None]
        with torch.no_grad():
            for blk, skip in zip(model.decoder.blocks, skips):
                x = blk(x, skip)
    finally:
        for h in hooks:
            h.remove()
    for b, (cin, cout) in enumerate(spec):
        side = size >> (4 - b)
        assert seen[b] == (1, cin, side, side), f"decoder block {b} input {seen[b]}"
        assert tuple(taps64[f"dec{b}"].shape) == (1, cout, side, side), f"dec{b} shape"
    assert tuple(taps64["map"].shape) == (1, 1, size, size)
    for j, ch in enumerate(ref.ENCODER_CHANNELS):
        side = size >> (j + 1)
        assert tuple(taps64[f"f{j + 1}"].shape) == (1, ch, side, side), f"f{j + 1} shape"


def check_encoder_padding(model) -> None:
    """Static-same padding as the spec states: stride 2 pads (k=3: 0/1, k=5: 1/2), stride 1 symmetric."""
    convs = [model.encoder._conv_stem] + [b._depthwise_conv for b in model.encoder._blocks]
    for conv in convs:
        k, s = conv.weight.shape[-1], conv.stride[0]
        pad = getattr(conv.static_padding, "padding", (0, 0, 0, 0))
        if s == 2:
            want = {3: (0, 1, 0, 1), 5: (1, 2, 1, 2)}[k]
        else:
            want = ((k - 1) // 2,) * 4
        assert tuple(pad) == want, f"padding {pad} for k={k} s={s}, want {want}"


# ---------------------------------------------------------------- one fixture
def check_kornia_resize(image_u8: np.ndarray, size: int) -> None:
    """The authors' dataset.py resizes with kornia's `Resize` (bilinear, align_corners=True, no
    antialiasing) on `pil_to_tensor(img).float() / 255`; the reference (and metauas) use
    `F.interpolate` the same way. Confirm they are bit-identical on this input, which may be
    non-square and upscaled along one side."""
    import kornia

    x = torch.from_numpy(np.ascontiguousarray(image_u8)).permute(2, 0, 1)[None].float() / 255.0
    theirs = kornia.augmentation.Resize((size, size))(x)
    ours = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
    assert torch.equal(theirs, ours), f"kornia Resize differs from F.interpolate at {size} for {image_u8.shape}"


def run(model, query_u8, prompt_u8, size, dtype):
    taps, stats = {}, {}
    q = ref.preprocess(query_u8, size, dtype)
    p = ref.preprocess(prompt_u8, size, dtype)
    with torch.no_grad():
        model(q, p, taps, stats)
    return q, p, taps, stats


def make_fixture(size: int, recipe_name: str, out_dir: str, jpeg: bool = False) -> dict:
    from safetensors.numpy import save_file

    recipe = RECIPES[recipe_name]
    t0 = time.time()
    state_np = synth.state_dict(recipe)
    state = {k: torch.from_numpy(v) for k, v in state_np.items()}
    model64 = ref.model_with_weights(state, torch.float64)
    model32 = ref.model_with_weights(state, torch.float32)
    check_encoder_padding(model64)
    if jpeg:
        images = {"prompt": {"file": JPEG_PROMPT}, "query": {"file": JPEG_QUERY}}
        prompt_u8 = ref.load_image(os.path.join(IMAGE_DIR, JPEG_PROMPT))
        query_u8 = ref.load_image(os.path.join(IMAGE_DIR, JPEG_QUERY))
        taps_kept = JPEG_TAPS
        for image_u8 in (prompt_u8, query_u8):
            check_kornia_resize(image_u8, size)
    else:
        images = {"prompt": PROMPT, "query": QUERY}
        prompt_u8, query_u8 = synth_image(PROMPT), synth_image(QUERY)
        taps_kept = TAPS

    q64, p64, taps64, stats64 = run(model64, query_u8, prompt_u8, size, torch.float64)
    t64 = time.time() - t0
    _, _, taps32, _ = run(model32, query_u8, prompt_u8, size, torch.float32)
    t32 = time.time() - t0 - t64

    check_decoder_shapes(model64, size, taps64)
    align_rel = check_alignment(model64, q64, p64, taps64)

    mp = taps64["map"].numpy()
    map_std = float(mp.std())
    saturated = float(((mp < 0.01) | (mp > 0.99)).mean())
    assert map_std > 0.05, f"map nearly constant (std {map_std})"
    assert saturated < 0.5, f"map mostly saturated ({saturated})"
    softmax = {f"level{i}": stats64[f"level{i}"] for i in range(3)}
    if recipe_name == "smooth":
        assert max(softmax.values()) < 0.5, f"smooth recipe not soft: {softmax}"
    if recipe_name == "sharp":
        assert min(softmax.values()) > 0.95, f"sharp recipe not sharp: {softmax}"

    tensors, shapes, errors = {}, {}, {}
    for tap in taps_kept:
        truth = taps64[tap].numpy().reshape(-1)
        f32 = taps32[tap].numpy().reshape(-1)
        assert taps32[tap].dtype == torch.float32 and taps64[tap].dtype == torch.float64
        diff = np.abs(f32.astype(np.float64) - truth)
        errors[tap] = {"max_abs": float(diff.max()), "p999_abs": float(np.quantile(diff, 0.999))}
        shapes[tap] = list(taps64[tap].shape)
        count = SAMPLES_MAP if tap == "map" else SAMPLES_INTERMEDIATE
        idx = sample_indices(truth.size, count, f"idx:{size}:{recipe_name}:{tap}")
        tensors[f"{tap}.idx"] = idx
        tensors[f"{tap}.truth"] = truth[idx].astype(np.float64)
        tensors[f"{tap}.torch32"] = f32[idx].astype(np.float32)

    import efficientnet_pytorch

    metadata = {
        "recipe": json.dumps(recipe),
        "size": str(size),
        "taps": json.dumps(shapes),
        "torch32_error": json.dumps(errors),
        "softmax_max_weight": json.dumps(softmax),
        "images": json.dumps(images),
        "synth_check": json.dumps(synth_check(state_np, prompt_u8, query_u8)),
        "torch_version": torch.__version__,
        "efficientnet_pytorch_version": efficientnet_pytorch.__version__,
    }
    name = f"s{size}_{recipe_name}" + ("_jpeg" if jpeg else "")
    path = os.path.join(out_dir, f"{name}.safetensors")
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o644)
    return {
        "path": path,
        "size": size,
        "recipe": recipe_name,
        "name": name,
        "errors": errors,
        "softmax": softmax,
        "map_std": map_std,
        "map_saturated": saturated,
        "align_rel": align_rel,
        "t64": t64,
        "t32": t32,
        "bytes": os.path.getsize(path),
    }


def summary_markdown(results: list[dict]) -> str:
    lines = [
        "# Conformance fixtures: PyTorch float32 error against the float64 truth",
        "",
        f"torch {torch.__version__}, efficientnet-pytorch 0.6.3, CPU, {torch.get_num_threads()} threads.",
        "Errors are over the full tensor: max |f32 - f64| / 99.9th percentile of |f32 - f64|.",
        "Regenerate: `python tools/reference/make_fixtures.py --out tests/fixtures/conformance`.",
        "",
    ]
    for r in results:
        recipe = RECIPES[r["recipe"]]
        lines += [
            f"## {r['name']} ({r['bytes']} bytes)",
            "",
            f"recipe {json.dumps(recipe)}; softmax mean max weight "
            + ", ".join(f"{k} {v:.4f}" for k, v in r["softmax"].items())
            + f"; map std {r['map_std']:.4f}, saturated (<0.01 or >0.99) {r['map_saturated']:.4%}",
            "",
            "| tap | max abs | p99.9 abs |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {e['max_abs']:.3e} | {e['p999_abs']:.3e} |" for t, e in r["errors"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/conformance")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--only-jpeg", action="store_true", help="only the JPEG cases")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    synth._self_check()
    os.makedirs(args.out, exist_ok=True)

    params = ref.parameter_count(ref.new_model())
    assert params == 22_130_305, f"parameter count {params}"
    print(f"parameters: {params} (model.parameters(); includes the unused _conv_head/_bn1)")

    start = time.time()
    results = []
    cases = [(size, name, False) for size in (int(s) for s in args.sizes.split(",")) for name in RECIPES]
    cases += [(size, name, True) for size, name in JPEG_CASES]
    if args.only_jpeg:
        cases = [c for c in cases if c[2]]
    for size, name, jpeg in cases:
        r = make_fixture(size, name, args.out, jpeg)
        results.append(r)
        print(
            f"{r['name']}: f64 {r['t64']:.1f}s f32 {r['t32']:.1f}s, {r['bytes']} bytes, "
            f"softmax {r['softmax']}, map std {r['map_std']:.4f}, alignment check rel {r['align_rel']:.2e}"
        )
    summary = summary_markdown(results)
    summary_path = os.path.join(args.out, "SUMMARY.md")
    if args.only_jpeg and os.path.exists(summary_path):
        # Keep the synthetic cases' sections; replace the JPEG ones.
        with open(summary_path, encoding="utf-8") as f:
            kept = f.read().split("\n## ")
        kept = [part for part in kept if "_jpeg (" not in part.split("\n", 1)[0]]
        summary = "\n## ".join(kept).rstrip() + "\n\n## " + summary.split("\n## ", 1)[1]
        summary = summary.replace("\n\n\n", "\n\n")
        if not summary.startswith("#"):
            summary = "## " + summary
    with open(summary_path, "w", encoding="utf-8") as f:
        f.write(summary)
    print(summary)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"total size of {args.out}: {total} bytes; run time {time.time() - start:.1f}s")
    assert total <= MAX_TOTAL_BYTES, "fixtures exceed 4 MB"
    return 0


if __name__ == "__main__":
    sys.exit(main())
