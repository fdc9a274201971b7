#!/usr/bin/env bash
# Builds the Python package into a venv under target/ (`pip install ./python`, as a user
# would) and runs python/tests with pytest against it and the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${METAUAS_PYTHON_VENV:-target/python-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check pytest pillow
"$venv/bin/pip" install -q --disable-pip-version-check ./python
[ -x target/release/metauas ] || cargo build --release --locked
exec "$venv/bin/python" -m pytest python/tests -q -p no:cacheprovider "$@"
