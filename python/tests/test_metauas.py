"""The Python package against independent evidence: the `metauas` binary's maps (bit for
bit), the PyTorch reference fixtures (within the conformance bounds), numpy inputs of every
accepted and refused kind, threads, the GIL, and bank round trips."""

import json
import os
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import metauas

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("METAUAS_BIN", ROOT / "target" / "release" / "metauas"))
SIZE = 64


def cli(*args):
    out = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def picture(seed, w=96, h=80, defect=None):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([90 + 60 * np.sin(x / 13 + seed) * np.cos(y / 17),
                    120 + 40 * np.cos(x / 9 - y / 21),
                    100 + 50 * np.sin((x + y) / 15 + seed / 3)], axis=-1)
    img = img + rng.normal(0, 6, size=img.shape)
    if defect:
        cx, cy, r = defect
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = [250, 40, 30]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("metauas-py")
    weights = d / "w.safetensors"
    cli("synth-weights", "--out", weights, "--seed", 3)
    paths = {}
    for name, seed, defect in [("prompt", 1, None), ("q1", 5, (30, 30, 9)), ("q2", 6, None),
                               ("q3", 7, (60, 20, 12))] + [(f"n{i}", 20 + i, None) for i in range(10)]:
        p = d / f"{name}.png"
        Image.fromarray(picture(seed, defect=defect)).save(p)
        paths[name] = p
    return d, weights, paths


@pytest.fixture(scope="module")
def engine(files):
    return metauas.Engine(files[1], size=SIZE, backend="cpu")


def cli_maps(files, *extra, queries=("q1", "q2", "q3")):
    d, weights, paths = files
    out = d / ("cli-" + "-".join(map(str, extra)).replace("/", "_")[-40:])
    lines = cli("segment", "--weights", weights, *extra, *sum((["--query", paths[q]] for q in queries), []),
                "--size", SIZE, "--backend", "cpu", "--no-images", "--out", out)
    return {Path(l["query"]).stem: (np.load(l["map"]), l) for l in map(json.loads, lines.splitlines())}


def test_maps_equal_the_cli_bit_for_bit(files, engine):
    d, weights, paths = files
    ref = cli_maps(files, "--prompt", paths["prompt"], "--prompt", paths["prompt"])
    prompt = engine.encode_prompt(paths["prompt"])
    for q in ("q1", "q2", "q3"):
        r = engine.segment(prompt, paths[q])
        assert r.map.dtype == np.float32 and r.map.shape == (SIZE, SIZE)
        assert np.array_equal(r.map, ref[q][0]), q
        assert r.score == np.float32(ref[q][1]["score"])
        assert r.anomalous is None and r.verdict is None and r.regions == []
        assert r.frame == (96, 80)
    batch = engine.segment_batch(prompt, [paths[q] for q in ("q1", "q2", "q3")])
    for q, r in zip(("q1", "q2", "q3"), batch):
        assert np.array_equal(r.map, ref[q][0])
    p2, r = engine.segment_pair(paths["prompt"], paths["q1"])
    assert np.array_equal(r.map, ref["q1"][0])
    assert np.array_equal(engine.segment(p2, paths["q2"]).map, ref["q2"][0])
    # The array is handed over, not copied each time.
    assert r.map is r.map
    big = r.map_at()
    assert big.shape == (80, 96) and big.dtype == np.float32
    assert r.map_at(32, 16).shape == (16, 32)


def test_calibrated_bank_equals_the_cli(files, engine, tmp_path):
    d, weights, paths = files
    bank = metauas.PromptBank.build(engine, [paths["prompt"]], names=["good"])
    cal = bank.calibrate(engine, [paths[f"n{i}"] for i in range(10)], method="quantile:0.9")
    assert cal["image"]["rule"] == "quantile:0.9" and bank.calibration["images"]
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = metauas.PromptBank.load(path, engine)
    assert loaded.names == ["good"] and len(loaded) == 1
    assert loaded.calibration == bank.calibration
    ref = cli_maps(files, "--bank", path)
    for q in ("q1", "q2", "q3"):
        r = engine.segment(loaded, paths[q])
        assert np.array_equal(r.map, ref[q][0])
        assert r.verdict == ref[q][1]["verdict"]
        assert r.regions == ref[q][1]["regions"]
        assert r.anomalous == ref[q][1]["verdict"]["anomalous"]
    other = metauas.Engine.synthetic(SIZE, seed=9)
    with pytest.raises(metauas.Error, match="other weights"):
        metauas.PromptBank.load(path, other)
    with pytest.raises(metauas.Error, match="other weights"):
        other.segment(loaded, paths["q1"])
    with pytest.raises(metauas.Error, match="another engine"):
        other.segment(engine.encode_prompt(paths["prompt"]), paths["q1"])
    with pytest.raises(metauas.Error, match="threshold rule"):
        bank.calibrate(engine, [paths["n0"]], method="median")


def read_safetensors(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    dtypes = {"F64": np.float64, "F32": np.float32, "I64": np.int64}
    tensors = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        tensors[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dtypes[t["dtype"]])
    return meta, tensors


@pytest.mark.parametrize("fixture", ["s256_smooth_jpeg"])
def test_pytorch_reference_within_the_conformance_bound(fixture):
    meta, t = read_safetensors(ROOT / "tests/fixtures/conformance" / f"{fixture}.safetensors")
    recipe = json.loads(meta["recipe"])
    images = json.loads(meta["images"])
    size = int(meta["size"])
    engine = metauas.Engine.synthetic(size, seed=recipe["seed"], gain_encoder=recipe["gain_encoder"],
                                      gain_alignment=recipe["gain_alignment"],
                                      gain_decoder=recipe["gain_decoder"], gain_head=recipe["gain_head"])
    corpus = ROOT / "tests/fixtures/images"
    prompt = engine.encode_prompt(corpus / images["prompt"]["file"])
    result = engine.segment(prompt, corpus / images["query"]["file"])
    ours = result.map.reshape(-1)[t["map.idx"]].astype(np.float64)
    err = np.sort(np.abs(ours - t["map.truth"]))
    torch_err = np.sort(np.abs(t["map.torch32"].astype(np.float64) - t["map.truth"]))
    p999 = lambda e: e[int(round((len(e) - 1) * 0.999))]
    recorded = json.loads(meta["torch32_error"])["map"]
    bound_max = 3.0 * min(recorded["max_abs"], torch_err[-1]) + 1e-5
    bound_p999 = 3.0 * min(recorded["p999_abs"], p999(torch_err)) + 1e-5
    assert err[-1] <= bound_max and p999(err) <= bound_p999, (err[-1], p999(err))


def test_taps_equal_the_cli_bundle_bit_for_bit(files, engine):
    d, weights, paths = files
    taps = engine.segment_with_taps(paths["prompt"], paths["q1"])
    out = d / "taps-cli"
    line = json.loads(cli("segment", "--weights", weights, "--prompt", paths["prompt"], "--query", paths["q1"],
                          "--size", SIZE, "--backend", "cpu", "--no-images", "--out", d / "taps-out",
                          "--taps", out))
    manifest = json.loads((Path(line["taps"]) / "manifest.json").read_text())
    assert list(taps) == [t["name"] for t in manifest["tensors"]]
    for t in manifest["tensors"]:
        a = taps[t["name"]]
        assert a.dtype == np.float32 and list(a.shape) == t["shape"], t["name"]
        assert np.array_equal(a, np.load(Path(line["taps"]) / t["file"])), t["name"]
    prompt = engine.encode_prompt(paths["prompt"])
    assert np.array_equal(taps["map"][0, 0], engine.segment(prompt, paths["q1"]).map)
    with pytest.raises(FileNotFoundError, match="no-such.png"):
        engine.segment_with_taps(d / "no-such.png", paths["q1"])


def test_taps_match_the_pytorch_fixture_where_it_samples_them():
    meta, t = read_safetensors(ROOT / "tests/fixtures/conformance" / "s256_smooth_jpeg.safetensors")
    recipe = json.loads(meta["recipe"])
    images = json.loads(meta["images"])
    engine = metauas.Engine.synthetic(int(meta["size"]), seed=recipe["seed"],
                                      **{k: recipe[k] for k in recipe if k.startswith("gain_")})
    corpus = ROOT / "tests/fixtures/images"
    taps = engine.segment_with_taps(corpus / images["prompt"]["file"], corpus / images["query"]["file"])
    names = {"f1": "query.encoder._swish", "f5": "query.encoder._blocks.31", "fused3": "alignment.2",
             "dec4": "decoder.blocks.4", "map": "map"}
    shapes = json.loads(meta["taps"])
    recorded = json.loads(meta["torch32_error"])
    for tap, name in names.items():
        assert list(taps[name].shape) == shapes[tap], tap
        err = np.abs(taps[name].reshape(-1)[t[f"{tap}.idx"]].astype(np.float64) - t[f"{tap}.truth"])
        assert err.max() <= 3.0 * recorded[tap]["max_abs"] + 1e-5, (tap, err.max())


def test_accepted_and_refused_images(files, engine):
    d, weights, paths = files
    prompt = engine.encode_prompt(paths["prompt"])
    rgb = np.asarray(Image.open(paths["q1"]).convert("RGB"))
    want = engine.segment(prompt, paths["q1"]).map
    for form in (rgb, str(paths["q1"]), paths["q1"], paths["q1"].read_bytes(), rgb.copy(order="C")):
        assert np.array_equal(engine.segment(prompt, form).map, want)
    gray = rgb[:, :, 1].copy()
    assert np.array_equal(engine.segment(prompt, gray).map,
                          engine.segment(prompt, np.repeat(gray[:, :, None], 3, axis=2)).map)
    refused = [
        (rgb.astype(np.float32), "dtype float32"),
        (rgb[:, ::2], "C-contiguous"),
        (np.zeros((8, 8, 4), np.uint8), "4 channels"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.zeros(8, np.uint8), "shape"),
        ([[1, 2, 3]], "expected a numpy uint8 array"),
        (b"not an image", "image bytes"),
    ]
    for bad, needle in refused:
        with pytest.raises(metauas.Error) as e:
            engine.segment(prompt, bad)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert isinstance(e.value, ValueError)
    with pytest.raises(FileNotFoundError):
        engine.segment(prompt, d / "missing.png")
    with pytest.raises(FileNotFoundError):
        metauas.Engine(d / "missing.safetensors")
    with pytest.raises(metauas.Error, match="multiple of 32"):
        metauas.Engine(weights, size=250)
    with pytest.raises(metauas.Error, match="backend"):
        metauas.Engine(weights, backend="tpu")
    with pytest.raises(metauas.Error, match="PromptBank only"):
        engine.segment(prompt, rgb, multi="mean")


def test_camera_frames_decode_as_pillow_decodes_them(files, engine, tmp_path):
    """5-megapixel JPEGs (which the decoder cuts into two row bands decoded at once) give
    the map of Pillow's pixels of the same file, bit for bit: 4:2:0, 4:2:2 and 4:4:4, one
    with restart markers."""
    d, weights, paths = files
    prompt = engine.encode_prompt(paths["prompt"])
    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:2048, 0:2448].astype(np.float32)
    frame = np.stack([120 + 80 * np.sin(x / 97) * np.cos(y / 61), 110 + 60 * np.cos((x - y) / 143),
                      90 + 70 * np.sin((x + y) / 211)], axis=-1)
    frame = np.clip(frame + rng.normal(0, 5, frame.shape), 0, 255).astype(np.uint8)
    for name, opts in [("q90_420", dict(quality=90)), ("q95_422", dict(quality=95, subsampling=1)),
                       ("q85_444_restart", dict(quality=85, subsampling=0, restart_marker_rows=2))]:
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(frame).save(path, **opts)
        pillow = np.asarray(Image.open(path).convert("RGB"))
        ours = engine.segment(prompt, path).map
        assert np.array_equal(ours, engine.segment(prompt, pillow).map), name


def test_threads_get_their_own_maps(files, engine):
    d, weights, paths = files
    prompt = engine.encode_prompt(paths["prompt"])
    want = {q: engine.segment(prompt, paths[q]).map for q in ("q1", "q2", "q3")}
    errors = []

    def work(k):
        for i in range(4):
            q = ("q1", "q2", "q3")[(k + i) % 3]
            if not np.array_equal(engine.segment(prompt, paths[q]).map, want[q]):
                errors.append((k, q))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_one_bank_shared_by_threads(files, engine):
    d, weights, paths = files
    bank = metauas.PromptBank.build(engine, [paths["prompt"]])
    errors = []

    def segmenting():
        try:
            for _ in range(6):
                engine.segment(bank, paths["q1"])
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(repr(e))

    def calibrating():
        try:
            for _ in range(3):
                bank.calibrate(engine, [paths[f"n{i}"] for i in range(3)])
                len(bank), bank.names, bank.calibration
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=f) for f in (segmenting, segmenting, calibrating)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with pytest.raises(metauas.Error, match="pixels"):
        engine.segment(bank, paths["q1"]).map_at(100_000, 100_000)


def test_segment_releases_the_gil():
    engine = metauas.Engine.synthetic(512)
    img = np.zeros((512, 512, 3), np.uint8)
    prompt = engine.encode_prompt(img)
    done = threading.Event()
    ticks = [0]

    def count():
        while not done.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    start = time.perf_counter()
    engine.segment(prompt, img)
    took = time.perf_counter() - start
    done.set()
    counter.join()
    # With the GIL held for the whole forward the counter would barely move.
    assert ticks[0] > 10_000, (ticks[0], took)
