#!/usr/bin/env bash
# The reference-bundle tests (tools/reference/tests): PyTorch's own bundles (export_taps.py,
# float32 and float64) and ONNX Runtime's against `metauas segment --taps`, through
# `metauas compare`. They run in the reference environment of tools/reference/README.md
# (torch's CPU wheel comes from download.pytorch.org; PyPI's torch pulls in gigabytes of CUDA
# libraries), so CI, which cannot reach that index, does not run them: there
# tests/taps.rs checks our bundles against the PyTorch fixtures instead.
#
#   METAUAS_REFERENCE_PYTHON=/opt/refenv/bin/python tools/reference/run_tests.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${METAUAS_REFERENCE_PYTHON:-/opt/refenv/bin/python}
if ! "$python" -c "import torch, efficientnet_pytorch" 2>/dev/null; then
    echo "run_tests.sh: $python has no torch/efficientnet_pytorch: set up the reference environment (tools/reference/README.md) or set METAUAS_REFERENCE_PYTHON" >&2
    exit 2
fi
"$python" -m pip install -q --disable-pip-version-check -r tools/reference/tests/requirements.txt
[ -x target/release/metauas ] || cargo build --release --locked
exec "$python" -m pytest tools/reference/tests "$@"
