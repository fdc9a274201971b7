"""docs/openapi.yaml, fuzzed with schemathesis against the running server for a bounded
number of examples per operation: no 5xx, no crash; every error is the one-line JSON."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_schemathesis_finds_no_server_error(server):
    out = subprocess.run(
        [str(SCHEMATHESIS), "run", str(ROOT / "docs" / "openapi.yaml"), "--url", server.url,
         "--checks", "not_a_server_error", "--max-examples", "25", "--phases", "examples,coverage,fuzzing",
         "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=900,
    )
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert server.proc.poll() is None, "the server died under fuzzing"
    assert not any("internal error" in l for l in server.log), "\n".join(server.log)
