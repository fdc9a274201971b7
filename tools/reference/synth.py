"""Deterministic synthetic weights and images, exactly as docs/SYNTHETIC.md specifies.

The Rust side (src/synth.rs) implements the same spec; both must agree bit for bit, so
every step here follows the document literally (uint64 wrapping arithmetic, float64
evaluation order, one rounding to float32).
"""

from __future__ import annotations

import os
import re

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1

DEFAULT_TSV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "weights", "metauas_state_dict.tsv"
)


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & MASK64
    return h


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping multiplies)."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


def draws(state0: int, n: int) -> np.ndarray:
    """Draws 1..n of the counter-form stream: mix(state0 + i * GAMMA)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        return mix(np.uint64(state0) + i * GAMMA)


def unit(r: np.ndarray) -> np.ndarray:
    return ((r >> np.uint64(40)).astype(np.float64) + 0.5) / float(1 << 24)


def sym(r: np.ndarray) -> np.ndarray:
    return 2.0 * unit(r) - 1.0


def read_tsv(path: str = DEFAULT_TSV) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) for every checkpoint entry, in file order."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            name, shape_text, dtype = line.split("\t")
            shape = tuple(int(d) for d in re.findall(r"\d+", shape_text))
            entries.append((name, shape, dtype))
    return entries


def gain_for(name: str, recipe: dict) -> float:
    first = name.split(".", 1)[0]
    key = {
        "encoder": "gain_encoder",
        "alignment": "gain_alignment",
        "decoder": "gain_decoder",
        "mask_head": "gain_head",
    }[first]
    return float(recipe[key])


def entry_value(name: str, shape: tuple[int, ...], names: set[str], recipe: dict) -> np.ndarray:
    """The synthetic value of one entry: float32 array (or int64 zeros for counters)."""
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    s = sym(draws(fnv1a64(f"{recipe['seed']}:{name}".encode("utf-8")), n))
    parent = name.rsplit(".", 1)[0]
    is_bn = f"{parent}.running_mean" in names
    if name.endswith(".running_var"):
        v = 1.0 + 0.5 * s
    elif name.endswith(".running_mean"):
        v = 0.1 * s
    elif name.endswith(".weight") and is_bn:
        v = 1.0 + 0.25 * s
    elif name.endswith(".bias") and is_bn:
        v = 0.1 * s
    elif name.endswith(".weight"):
        if len(shape) != 4:
            raise ValueError(f"{name}: conv weight must be 4-D, got {shape}")
        fan_in = shape[1] * shape[2] * shape[3]
        v = s * gain_for(name, recipe) * np.sqrt(3.0 / fan_in)
    elif name.endswith(".bias"):
        v = 0.1 * s
    else:
        raise ValueError(f"{name}: no synthetic rule for this entry")
    return v.astype(np.float32).reshape(shape)


def state_dict(recipe: dict, tsv_path: str = DEFAULT_TSV) -> dict[str, np.ndarray]:
    """All 820 entries as numpy arrays (float32, counters int64), keyed by name."""
    entries = read_tsv(tsv_path)
    names = {name for name, _, _ in entries}
    return {name: entry_value(name, shape, names, recipe) for name, shape, _ in entries}


def image(seed: int, width: int, height: int, defect=None) -> np.ndarray:
    """Synthetic 8-bit RGB image, shape (height, width, 3), uint8."""
    r = draws(fnv1a64(f"image:{seed}".encode("utf-8")), width * height * 3)
    r = r.reshape(height, width, 3)
    y = np.arange(height, dtype=np.int64)[:, None, None]
    x = np.arange(width, dtype=np.int64)[None, :, None]
    c = np.arange(3, dtype=np.int64)[None, None, :]
    smooth = (x * (3 + c) + y * (5 - c) + (x * y) // 16) % 512
    tri = np.where(smooth < 256, smooth, 511 - smooth)
    v = (tri * 3 + (r >> np.uint64(56)).astype(np.int64)) // 4
    if defect is not None:
        x0, y0, side = defect
        inside = (x >= x0) & (x < x0 + side) & (y >= y0) & (y < y0 + side)
        v = np.where(inside, 255 - v, v)
    if v.min() < 0 or v.max() > 255:
        raise AssertionError("image value out of range")
    return v.astype(np.uint8)


def _image_naive(seed: int, width: int, height: int, defect=None) -> np.ndarray:
    """Literal per-byte loop of the spec, used to check the vectorised version."""
    state = fnv1a64(f"image:{seed}".encode("utf-8"))
    out = np.zeros((height, width, 3), dtype=np.uint8)
    i = 0
    for y in range(height):
        for x in range(width):
            for c in range(3):
                i += 1
                z = (state + i * 0x9E3779B97F4A7C15) & MASK64
                z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
                z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
                r = z ^ (z >> 31)
                smooth = (x * (3 + c) + y * (5 - c) + (x * y) // 16) % 512
                tri = smooth if smooth < 256 else 511 - smooth
                v = (tri * 3 + (r >> 56)) // 4
                if defect is not None:
                    x0, y0, side = defect
                    if x0 <= x < x0 + side and y0 <= y < y0 + side:
                        v = 255 - v
                out[y, x, c] = v
    return out


def _self_check() -> None:
    # Scalar SplitMix64 reference (Vigna's splitmix64 with seed 0: first output).
    assert int(draws(0, 1)[0]) == 0xE220A8397B1DCDAF
    # FNV-1a test vector: "a" -> 0xaf63dc4c8601ec8c.
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    a = image(2, 23, 17, (5, 3, 6))
    b = _image_naive(2, 23, 17, (5, 3, 6))
    assert np.array_equal(a, b)


if __name__ == "__main__":
    _self_check()
    print("synth self-check ok")
