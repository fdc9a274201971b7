"""Reference bundles end to end: PyTorch (float32 and float64, forward hooks) and ONNX
Runtime bundles from tools/reference/export_taps.py against `metauas segment --taps`,
held together by `metauas compare`. Inputs: synthetic weights from `metauas synth-weights`
and two JPEGs of the image corpus (decoded by Pillow for PyTorch, by us for metauas)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
METAUAS = os.path.join(ROOT, "target", "release", "metauas")
EXPORT = os.path.join(ROOT, "tools", "reference", "export_taps.py")
IMAGES = os.path.join(ROOT, "tests", "fixtures", "images")
PROMPT = os.path.join(IMAGES, "pil_420_333x217.jpg")
QUERY = os.path.join(IMAGES, "pil_frame_1024x768.jpg")
# Ours against the float64 truth may be at most this many times PyTorch float32's error
# (plus a floor for tensors where both are at rounding level), as in tests/conformance.rs.
FACTOR, SLACK = 3.0, 1e-5


def run(*args, check=True):
    out = subprocess.run(args, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{args}: exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def compare(a, b, *flags):
    out = run(METAUAS, "compare", a, b, "--json", *flags, check=False)
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    assert report["passed"] == (out.returncode == 0)
    return report


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("taps")
    weights = str(d / "w.safetensors")
    run(METAUAS, "synth-weights", "--out", weights, "--seed", "3")
    out = run(METAUAS, "segment", "--weights", weights, "--prompt", PROMPT, "--query", QUERY,
              "--backend", "cpu", "--taps", str(d / "ours"), "--out", str(d / "out"), "--no-images")
    line = json.loads(out.stdout)
    made = {"ours": line["taps"]}
    for name, extra in (("torch32", []), ("torch64", ["--float64"]), ("ort", ["--engine", "onnxruntime"])):
        made[name] = str(d / name)
        run(sys.executable, EXPORT, "--weights", weights, "--prompt", PROMPT, "--query", QUERY,
            "--size", "256", "--out", made[name], *extra)
    made["map"] = line["map"]
    return made


def rows(report):
    return {t["name"]: t for t in report["tensors"]}


def test_same_names_shapes_and_manifest_fields(bundles):
    ours = json.load(open(os.path.join(bundles["ours"], "manifest.json")))
    theirs = json.load(open(os.path.join(bundles["torch32"], "manifest.json")))
    key = lambda m: [(t["name"], t["module"], t["call"], t["shape"]) for t in m["tensors"]]
    assert key(ours) == key(theirs)
    for field in ("size",):
        assert ours[field] == theirs[field]
    assert ours["weights"]["sha256"] == theirs["weights"]["sha256"]
    assert ours["inputs"] == {k: dict(v, file=ours["inputs"][k]["file"]) for k, v in theirs["inputs"].items()}
    report = compare(bundles["ours"], bundles["torch32"])
    assert report["warnings"] == []
    assert all(t["status"] in ("ok", "fails") for t in report["tensors"])


def test_ours_is_as_close_to_the_float64_truth_as_pytorch_float32(bundles):
    ours = rows(compare(bundles["ours"], bundles["torch64"], "--metric", "abs", "--tol", "1"))
    torch32 = rows(compare(bundles["torch32"], bundles["torch64"], "--metric", "abs", "--tol", "1"))
    worse = [
        f"{n}: {ours[n]['max_abs']:.3e} vs PyTorch {torch32[n]['max_abs']:.3e}"
        for n in ours
        if ours[n]["max_abs"] > FACTOR * torch32[n]["max_abs"] + SLACK
        or ours[n]["p999_abs"] > FACTOR * torch32[n]["p999_abs"] + SLACK
    ]
    assert not worse, worse
    # The map, where a user looks: ours is closer to the truth than PyTorch float32.
    assert ours["map"]["max_abs"] < torch32["map"]["max_abs"]


def test_engines_agree_within_the_default_tolerance(bundles):
    for a, b in (("ours", "torch32"), ("ort", "torch32"), ("ours", "torch64"), ("ort", "torch64")):
        report = compare(bundles[a], bundles[b])
        assert report["passed"], (a, b, report["first_failure"])
        assert report["compared"] == len(report["tensors"]) == 37


def test_bundle_map_is_the_segment_map(bundles):
    ours = np.load(os.path.join(bundles["ours"], "map.npy"))
    seg = np.load(bundles["map"])
    assert ours.shape == (1, 1, 256, 256) and ours.dtype == np.float32
    assert np.array_equal(ours[0, 0], seg)


def test_first_failure_is_the_tensor_numpy_perturbed(bundles, tmp_path):
    b = tmp_path / "perturbed"
    shutil.copytree(bundles["torch32"], b)
    name = "query.alignment.1.alignment_layer.dimensionality_reduction"
    arr = np.load(b / f"{name}.npy")
    arr[0, 3, 2, 1] += 0.05 * np.abs(arr).max()
    np.save(b / f"{name}.npy", arr)
    report = compare(bundles["ours"], str(b))
    assert report["first_failure"] == name
    assert [t["name"] for t in report["tensors"] if t["status"] != "ok"] == [name]
    # The same tensors as an .npz (numpy.savez: another engine's usual dump).
    npz = tmp_path / "bundle.npz"
    np.savez(npz, **{n[:-4]: np.load(b / n) for n in os.listdir(b) if n.endswith(".npy")})
    report = compare(bundles["ours"], str(npz))
    assert report["first_failure"] == name
