#!/usr/bin/env bash
# The NVIDIA measurement kit (issue 21): one command on a machine with no Rust and no network.
# Everything it runs travels with the working tree: the stripped release binary
# (target/gpu-kit/metauas), the conformance test binary (target/gpu-kit/conformance: the GPU
# cases against the float64 truth of tests/fixtures, f32 and f16), the Vulkan loader
# (.gl/*.deb, see /work/.library/device/README.md) and efficientnet-pytorch (.whl/, for
# PyTorch's side). Prepare here:
#   cargo build --release && mkdir -p target/gpu-kit && strip -o target/gpu-kit/metauas target/release/metauas
#   strip -o target/gpu-kit/conformance "$(cargo test --release --no-run --test conformance 2>&1 | grep -o 'target/release/deps/conformance-[0-9a-f]*')"
#   python3 -m pip download --no-deps efficientnet-pytorch==0.6.3 -d .whl
# Then, on the device: tools/gpu_bench.sh OUT_DIR   (about 6 minutes)
# It prints `gpu-info`, then per size (256, 512), precision (f32, f16) and batch (1, 16) the
# `bench --json` line, a `--profile` at 256 and 512 (f32), the conformance of the GPU map
# against the CPU backend's on the same machine (`segment --taps` + `compare`), PyTorch eager
# on the same GPU (with and without TF32), and last one table.
set -uo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
out=${1:-${OUT:-gpu-bench-out}}
mkdir -p "$out"
bin=target/gpu-kit/metauas
[ -x "$bin" ] || bin=target/release/metauas
if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if ! "$bin" gpu-info >/dev/null 2>&1; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
"$bin" gpu-info --json | tee "$out/gpu-info.json"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* && export PYTHONPATH=/tmp/site
fi
: >"$out/metauas.jsonl"
for size in ${SIZES:-256 512}; do
    for precision in f32 f16; do
        for batch in ${BATCHES:-1 16}; do
            timeout 120 "$bin" bench --backend gpu --size "$size" --precision "$precision" --batch "$batch" \
                --iters "${ITERS:-30}" --json 2>>"$out/stderr.log" | tee -a "$out/metauas.jsonl"
        done
    done
    timeout 60 "$bin" bench --backend gpu --size "$size" --iters "${PROFILE_ITERS:-5}" --profile >"$out/profile_$size.txt" 2>&1
done
# Conformance on this GPU against the float64 truth: every fixture, f32 and f16 (the test
# binary prints each tap's max / p99.9 error; METAUAS_REQUIRE_GPU=1: fail, never skip).
if [ -x target/gpu-kit/conformance ]; then
    METAUAS_REQUIRE_GPU=1 METAUAS_FIXTURES="$PWD/tests/fixtures" timeout 120 \
        target/gpu-kit/conformance gpu_ --nocapture --test-threads 1 >"$out/conformance-truth.txt" 2>&1
    grep -E '^test |errors vs|  map ' "$out/conformance-truth.txt"
fi
# And the GPU's bundle against the CPU backend's (proven against PyTorch) on a JPEG pair.
w="$out/w.safetensors"
"$bin" synth-weights --out "$w" --seed 3 2>/dev/null
img=tests/fixtures/images
segment() {
    "$bin" segment --weights "$w" --backend "$1" --precision "$2" --size 512 --no-images \
        --prompt "$img/pil_420_333x217.jpg" --query "$img/pil_frame_1024x768.jpg" \
        --taps "$out/taps-$1-$2" --out "$out/maps-$1-$2" >/dev/null 2>>"$out/stderr.log"
}
segment cpu f32
for precision in f32 f16; do
    segment gpu "$precision"
    "$bin" compare "$out/taps-gpu-$precision/pil_frame_1024x768" "$out/taps-cpu-f32/pil_frame_1024x768" \
        --metric abs --tol 1 --json >"$out/conformance-$precision.json" 2>>"$out/stderr.log"
done
rm -rf "$out"/taps-* "$out"/maps-* "$w"
timeout 240 python3 tools/torch_gpu_bench.py --iters "${ITERS:-30}" | tee "$out/pytorch.jsonl"
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "metauas.jsonl")) if l.startswith("{")]
torch = [json.loads(l) for l in open(os.path.join(out, "pytorch.jsonl")) if l.startswith("{")]
def pt(case, size, batch, tf32):
    for t in torch:
        if (t["case"], t["size"], t["batch"], t["tf32"]) == (case, size, batch, tf32):
            return t["median_ms"]
print("\n| size | precision | batch | metauas cached ms | full ms | batch images/s | PyTorch cached ms (TF32 / off) | full ms (TF32 / off) | dispatches |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    prec = r["device"].rsplit("[", 1)[-1].rstrip("]")
    b = r.get("batch", 1)
    print(f"| {r['size']} | {prec} | {b} | {r['cached_ms']:.3f} | {r['full_ms']:.3f} | {r.get('batch_images_per_s', float('nan')):.0f} "
          f"| {pt('cached', r['size'], b, True)} / {pt('cached', r['size'], b, False)} "
          f"| {pt('full', r['size'], b, True)} / {pt('full', r['size'], b, False)} | {r['shape']['cached']['dispatches']} |")
for p in ("f32", "f16"):
    f = os.path.join(out, f"conformance-{p}.json")
    if os.path.exists(f) and os.path.getsize(f):
        rep = json.load(open(f))
        m = {t["name"]: t for t in rep["tensors"]}["map"]
        print(f"conformance {p} (GPU vs CPU, 512, JPEG pair): map max abs {m['max_abs']:.3e}, p99.9 {m['p999_abs']:.3e}")
PY
