"""Small checkpoint fixtures for the Rust weights loader (src/io/weights/).

Regenerate (from the repository root, with the reference venv):

    /opt/refenv/bin/python tools/reference/make_ckpt_fixtures.py [--out tests/fixtures/ckpt] [--check-model]

Everything is deterministic (fixed seeds), written with the real `torch.save` where the file is
meant to be a genuine checkpoint, and by hand where it is meant to be hostile. Outputs:

- small_state_dict.pt: OrderedDict with float32 / float16 / bfloat16 / int64 entries under official
  names, a view with a storage offset, a transposed view, two entries sharing one storage, a
  zero-stride (expanded) view and a `_metadata` attribute like a real state_dict.
- small_state_dict.expected.safetensors: contiguous copies of the same entries, same names and
  dtypes (float16/bfloat16 kept as they are), written by the `safetensors` package. Its metadata
  `views` records, per entry, [dtype, storage offset, strides, storage group] as torch.load sees
  them (entries with the same group share one storage).
- evil_system.pt, evil_builtins_eval.pt, evil_stack_global.pt, evil_nested_reduce.pt: zips whose
  pickle calls a forbidden global; here they are only handed to torch.load(weights_only=True),
  which must refuse them (their payload just touches a canary file).
- truncated.pt (small_state_dict.pt cut in half), missing_storage.pt (one storage record left
  out), view_out_of_bounds.pt (a tensor's size edited to reach past its storage),
  not_a_zip.pt (garbage).
- metauas_strided.ckpt: all 820 entries of weights/metauas_state_dict.tsv at their official
  shapes; each float entry is an `as_strided` view (stride 1 along every dim, a per-entry storage
  offset) into one of a few small shared storages, so the file stays small.
- metauas_strided.storages.safetensors: those storages (`storage.<name>`), a few entries
  materialized by torch (`expected.<entry>`), and metadata `views` = JSON
  {entry: [storage name, offset, [strides]]} so a test can recompute every entry.

`--check-model` additionally runs tools/reference/metauas_ref.py on the strided weights and
prints activation statistics (the values are meant to keep the map finite and not saturated).
With GAIN = 0.9 the map on the synthetic prompt/query pair at 256 spans about 0.18 .. 0.80 and
every activation stays below ~130 in magnitude; GAIN = 1.5 already saturates it (structured
as_strided weights amplify more than i.i.d. ones would).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
TSV = os.path.join(ROOT, "weights", "metauas_state_dict.tsv")


# ------------------------------------------------------------------ helpers
def read_tsv(path: str = TSV) -> list[tuple[str, tuple[int, ...], str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            name, shape_text, dtype = line.split("\t")
            shape = tuple(int(d) for d in shape_text.strip("()").split(",") if d.strip())
            out.append((name, shape, dtype))
    return out


def fixed_time(name: str) -> zipfile.ZipInfo:
    """A record header with a fixed date, so regenerated fixtures are byte-identical."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


def zip_bytes(prefix: str, records: list[tuple[str, bytes]]) -> bytes:
    """A torch-style archive: stored (uncompressed) records under `prefix/`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(fixed_time(f"{prefix}/{name}"), data)
    return buf.getvalue()


def rezip(src: bytes, edit) -> bytes:
    """Copy a zip record by record; `edit(name, data)` returns new bytes or None to drop it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(fixed_time(info.filename), data)
    return out.getvalue()


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def view_record(t: torch.Tensor) -> tuple[int, list[int]]:
    return int(t.storage_offset()), [int(s) for s in t.stride()]


# ------------------------------------------------------------------ 1. small state dict
def small_state_dict() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(1234)
    sd = collections.OrderedDict()
    sd["encoder._conv_stem.weight"] = torch.randn(48, 3, 3, 3, generator=g)
    sd["encoder._bn0.weight"] = torch.rand(48, generator=g) + 0.5
    base = torch.randn(53, generator=g)
    sd["encoder._bn0.bias"] = base[5:]  # storage offset 5
    sd["encoder._bn0.running_mean"] = base[:48]  # shares `base`'s storage, offset 0
    sd["encoder._bn0.num_batches_tracked"] = torch.tensor(123456789012, dtype=torch.int64)
    m = torch.randn(12, 48, generator=g)
    sd["encoder._blocks.0._se_reduce.weight"] = m.t().contiguous().t().reshape(12, 48, 1, 1)
    # Transposed, non-contiguous view: shape (48, 12), strides (1, 48).
    sd["decoder.transposed_view"] = torch.randn(12, 48, generator=g).t()
    sd["decoder.blocks.0.conv1.1.weight"] = (torch.randn(6, 5, generator=g) * 3).to(torch.float16)
    sd["decoder.blocks.0.conv1.1.bias"] = (torch.randn(7, generator=g) * 100).to(torch.bfloat16)
    sd["alignment.0.alignment_layer.dimensionality_reduction.bias"] = torch.randn(
        9, generator=g, dtype=torch.float64
    )
    sd["decoder.int32_table"] = torch.arange(-3, 9, dtype=torch.int32).reshape(3, 4)
    # Zero stride: every row is the same 5 values.
    sd["decoder.expanded"] = torch.randn(5, generator=g).expand(4, 5)
    # Strided slice of a matrix: non-trivial offset and strides in 2-D.
    big = torch.randn(10, 11, generator=g)
    sd["decoder.sliced"] = big[2:9:3, 1:10:2]
    sd["mask_head.weight"] = torch.randn(1, 48, 1, 1, generator=g)
    sd["mask_head.bias"] = torch.tensor([0.25])
    sd["scalar.float"] = torch.tensor(-1.5)
    sd["empty"] = torch.zeros(0, 3)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("encoder", {"version": 1})])
    return sd


def write_small(out: str) -> bytes:
    sd = small_state_dict()
    path = os.path.join(out, "small_state_dict.pt")
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    views = {}
    groups = {}  # storage data pointer -> group number, in order of first use
    for k, v in loaded.items():
        assert torch.equal(v, sd[k]) and v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
        offset, stride = view_record(v)
        group = groups.setdefault(v.untyped_storage().data_ptr(), len(groups))
        views[k] = [str(v.dtype).replace("torch.", ""), offset, stride, group]
    # The views must survive the round trip as views (not copies).
    assert loaded["encoder._bn0.bias"].storage_offset() == 5
    assert loaded["encoder._bn0.bias"].untyped_storage().data_ptr() == (
        loaded["encoder._bn0.running_mean"].untyped_storage().data_ptr()
    )
    assert not loaded["decoder.transposed_view"].is_contiguous()
    assert loaded["decoder.expanded"].stride() == (0, 1)
    expected = {k: v.contiguous().clone() for k, v in loaded.items()}
    save_file(
        expected,
        os.path.join(out, "small_state_dict.expected.safetensors"),
        metadata={"views": json.dumps(views, sort_keys=True)},
    )
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------ 2. hostile files
def pickle_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + len(b).to_bytes(4, "little") + b


def hostile_zip(pickle: bytes) -> bytes:
    return zip_bytes("archive", [("data.pkl", pickle), ("byteorder", b"little"), ("version", b"3\n")])


# A canary: if any loader ever executed these, this file would appear.
CANARY = "touch /tmp/metauas_checkpoint_code_was_executed"


def evil_pickles() -> dict[str, bytes]:
    proto = b"\x80\x02"
    od_start = b"ccollections\nOrderedDict\nq\x00)Rq\x01"
    system_call = b"cposix\nsystem\nq\x02" + pickle_str(CANARY) + b"\x85R"
    eval_call = b"cbuiltins\neval\nq\x02" + pickle_str("__import__('os').system('" + CANARY + "')") + b"\x85R"
    stack_global = (
        b"\x80\x04"
        + b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94"
        + b"\x8c"
        + bytes([len(CANARY)])
        + CANARY.encode()
        + b"\x94\x85\x94R\x94."
    )
    # The forbidden call sits inside a tensor's arguments, after a legitimate entry's key.
    nested = (
        proto
        + od_start
        + pickle_str("encoder._bn0.weight")
        + b"ctorch._utils\n_rebuild_tensor_v2\nq\x03("
        + system_call
        + b"K\x00K\x01\x85K\x01\x85\x89)tRs."
    )
    return {
        "evil_system.pt": proto + od_start + pickle_str("x") + system_call + b"s.",
        "evil_builtins_eval.pt": proto + eval_call + b".",
        "evil_stack_global.pt": stack_global,
        "evil_nested_reduce.pt": nested,
    }


def make_view_out_of_bounds(small: bytes) -> bytes:
    """Edit mask_head.bias (1 element, own storage) to claim 3 elements."""

    def edit(name: str, data: bytes):
        if not name.endswith("data.pkl"):
            return data
        key = pickle_str("mask_head.bias")
        at = data.index(key)
        # After the key: ... BINPERSID, offset `K\x00`, size `K\x01\x85` (BININT1 1, TUPLE1).
        size_at = data.index(b"QK\x00K\x01\x85", at) + 4
        assert data[size_at] == 1
        return data[:size_at] + b"\x03" + data[size_at + 1 :]

    return rezip(small, edit)


def make_missing_storage(small: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(small)) as z:
        data_records = sorted(n for n in z.namelist() if "/data/" in n)
    dropped = data_records[0]
    return rezip(small, lambda name, data: None if name == dropped else data)


def write_hostile(out: str, small: bytes) -> None:
    for name, pkl in evil_pickles().items():
        write(os.path.join(out, name), hostile_zip(pkl))
    write(os.path.join(out, "truncated.pt"), small[: len(small) // 2])
    write(os.path.join(out, "missing_storage.pt"), make_missing_storage(small))
    write(os.path.join(out, "view_out_of_bounds.pt"), make_view_out_of_bounds(small))
    rng = np.random.default_rng(99)
    write(os.path.join(out, "not_a_zip.pt"), b"GARBAGE!" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    # torch itself must refuse the evil ones under weights_only (a sanity check on the fixtures).
    for name in evil_pickles():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # protocol-4 notice for evil_stack_global
                torch.load(os.path.join(out, name), weights_only=True)
        except Exception:
            pass
        else:
            raise AssertionError(f"torch.load accepted {name}")
    assert not os.path.exists("/tmp/metauas_checkpoint_code_was_executed")


# ------------------------------------------------------------------ 3. full strided checkpoint
# Conv weights are grouped by fan-in; each group's storage is U(-a, a) with
# a = GAIN * sqrt(3 / fan_rep), fan_rep a typical fan-in of the group.
CONV_GROUPS = ((48, 16.0), (400, 150.0), (10**9, 1000.0))  # (max fan_in, representative fan_in)
GAIN = 0.9
OFFSET_SPAN = 256  # per-entry offsets are in [0, OFFSET_SPAN)


def entry_kind(name: str, names: set[str]) -> str:
    parent = name.rsplit(".", 1)[0]
    is_bn = f"{parent}.running_mean" in names
    if name.endswith("num_batches_tracked"):
        return "counter"
    if name.endswith(".running_var") or (name.endswith(".weight") and is_bn):
        return "positive"
    if name.endswith(".running_mean") or name.endswith(".bias"):
        return "small"
    return "conv"


def conv_group(shape: tuple[int, ...]) -> str:
    fan_in = shape[1] * shape[2] * shape[3]
    for i, (limit, _) in enumerate(CONV_GROUPS):
        if fan_in <= limit:
            return f"conv{i}"
    raise AssertionError(shape)


def entry_offset(name: str) -> int:
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & ((1 << 64) - 1)
    return h % OFFSET_SPAN


def strided_state_dict() -> tuple[collections.OrderedDict, dict, dict]:
    entries = read_tsv()
    names = {n for n, _, _ in entries}
    plan = {}  # name -> (storage, offset, size, stride)
    need = collections.defaultdict(int)
    for name, shape, dtype in entries:
        kind = entry_kind(name, names)
        if kind == "counter":
            assert dtype == "int64" and shape == ()
            storage, offset = "counters", entry_offset(name) % 16
            stride = ()
        else:
            assert dtype == "float32"
            storage = conv_group(shape) if kind == "conv" else kind
            offset = entry_offset(name)
            stride = (1,) * len(shape)
        reach = offset + sum(d - 1 for d in shape) + 1
        need[storage] = max(need[storage], reach)
        plan[name] = (storage, offset, shape, stride)
    g = torch.Generator().manual_seed(4321)
    storages = {}
    for key, n in sorted(need.items()):
        if key == "counters":
            storages[key] = torch.arange(n, dtype=torch.int64) * 1000 + 7
        elif key == "positive":
            storages[key] = torch.rand(n, generator=g) + 0.5
        elif key == "small":
            storages[key] = (torch.rand(n, generator=g) * 2 - 1) * 0.1
        else:
            a = GAIN * (3.0 / CONV_GROUPS[int(key[4:])][1]) ** 0.5
            storages[key] = (torch.rand(n, generator=g) * 2 - 1) * a
    sd = collections.OrderedDict()
    for name, (storage, offset, shape, stride) in plan.items():
        sd[name] = torch.as_strided(storages[storage], shape, stride, offset)
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    views = {name: [s, o, list(st)] for name, (s, o, _, st) in plan.items()}
    return sd, storages, views


EXPECTED_ENTRIES = (
    "encoder._conv_stem.weight",
    "encoder._bn0.running_var",
    "encoder._blocks.0._se_reduce.weight",
    "encoder._blocks.31._bn2.bias",
    "alignment.2.alignment_layer.dimensionality_reduction.bias",
    "mask_head.weight",
    "mask_head.bias",
)


def write_strided(out: str) -> None:
    sd, storages, views = strided_state_dict()
    path = os.path.join(out, "metauas_strided.ckpt")
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded.keys()) == list(sd.keys()) and len(loaded) == 820
    loaded_ptrs = collections.defaultdict(set)
    for name, t in loaded.items():
        storage, offset, stride = views[name]
        assert torch.equal(t, sd[name]), name
        assert t.storage_offset() == offset and list(t.stride()) == stride, name
        loaded_ptrs[storage].add(t.untyped_storage().data_ptr())
    # Every entry of one storage still shares it after loading: torch.save kept the views.
    assert all(len(p) == 1 for p in loaded_ptrs.values()), loaded_ptrs
    tensors = {f"storage.{k}": v.clone() for k, v in storages.items()}
    for name in EXPECTED_ENTRIES:
        tensors[f"expected.{name}"] = loaded[name].contiguous().clone()
    save_file(
        tensors,
        os.path.join(out, "metauas_strided.storages.safetensors"),
        metadata={"views": json.dumps(views, sort_keys=True)},
    )


def check_model(out: str) -> None:
    """Run the reference model on the strided weights: the map must be finite and spread out."""
    sys.path.insert(0, HERE)
    import metauas_ref
    import synth

    torch.manual_seed(0)
    state = metauas_ref.load_state_dict_file(os.path.join(out, "metauas_strided.ckpt"))
    model = metauas_ref.model_with_weights(state, torch.float32)
    q = metauas_ref.preprocess(synth.image(2, 280, 240, (150, 60, 48)), 256, torch.float32)
    p = metauas_ref.preprocess(synth.image(1, 300, 220, None), 256, torch.float32)
    taps, stats = {}, {}
    with torch.no_grad():
        model(q, p, taps=taps, stats=stats)
    for k, v in taps.items():
        print(f"{k:8s} std {float(v.std()):.4g}  absmax {float(v.abs().max()):.4g}  finite {bool(torch.isfinite(v).all())}")
    m = taps["map"]
    print(f"map min {float(m.min()):.6g} max {float(m.max()):.6g} mean {float(m.mean()):.6g}; softmax max-weight {stats}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "ckpt"))
    ap.add_argument("--check-model", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    small = write_small(args.out)
    write_hostile(args.out, small)
    write_strided(args.out)
    if args.check_model:
        check_model(args.out)
    total = 0
    for name in sorted(os.listdir(args.out)):
        os.chmod(os.path.join(args.out, name), 0o644)
        size = os.path.getsize(os.path.join(args.out, name))
        total += size
        print(f"{size:8d}  {name}")
    print(f"{total:8d}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
