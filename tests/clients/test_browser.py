"""The inspection page (`GET /`) in headless Chromium from Debian's `chromium` package, driven
by playwright-core (tests/browser/inspect.mjs): no console error, a dropped prompt and query
show an overlay whose pixels equal the API's PNG, the threshold slider gives the API's region
count, a calibrated product shows its verdict, a broken image shows its one-line error. The
screenshot goes to target/inspection.png (docs/inspection.png is a committed copy)."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCRIPT = ROOT / "tests" / "browser" / "inspect.mjs"
MODULES = ROOT / "tests" / "browser" / "node_modules"
REQUIRED = bool(os.environ.get("METAUAS_REQUIRE_BROWSER"))


@pytest.mark.skipif(not REQUIRED and not (os.path.exists(CHROMIUM) and MODULES.is_dir()
                                          and shutil.which("node")),
                    reason="needs chromium, node and `npm install` in tests/browser")
def test_inspection_page_in_chromium(server, setup, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    shot = ROOT / "target" / "inspection.png"
    shot.parent.mkdir(exist_ok=True)
    out = subprocess.run(
        ["node", str(SCRIPT), server.url + "/", str(setup.normal / "good1.png"),
         str(setup.query_files[1]), str(broken), "bottle", str(shot)],
        capture_output=True, text=True, timeout=300)
    assert out.stdout.strip(), out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed and out.returncode == 0, json.dumps(report, indent=1) + out.stderr
    assert len(report["checks"]) >= 8
    assert shot.is_file() and shot.stat().st_size > 10_000
