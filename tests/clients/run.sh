#!/usr/bin/env bash
# The client tests (tests/clients): the release binary against clients and tools nobody here
# wrote: tritonclient and the kserve SDK (Open Inference Protocol), nginx in front of three
# replicas, schemathesis on docs/openapi.yaml, the deploy/ manifests. Needs python3 (with
# venv) and nginx (`apt-get install nginx`); Python packages go into a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${METAUAS_CLIENT_VENV:-target/client-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
[ -x target/release/metauas ] || cargo build --release --locked
exec "$venv/bin/python" -m pytest tests/clients "$@"
