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


@pytest.mark.skipif(not REQUIRED and not (os.path.exists(CHROMIUM) and MODULES.is_dir()
                                          and shutil.which("node")),
                    reason="needs chromium, node and `npm install` in tests/browser")
def test_eval_report_in_chromium(setup, tmp_path):
    """`metauas eval` on a small MVTec-layout set; its report.html opened and screenshotted
    (target/report.png; docs/report.png is a committed copy)."""
    from PIL import Image
    from conftest import SIZE, run, synthetic_image
    import numpy as np

    root = tmp_path / "mvtec"
    for cls in ("bottle", "cable"):
        (root / cls / "train" / "good").mkdir(parents=True)
        (root / cls / "test" / "good").mkdir(parents=True)
        (root / cls / "test" / "broken").mkdir(parents=True)
        (root / cls / "ground_truth" / "broken").mkdir(parents=True)
        synthetic_image(1).save(root / cls / "train" / "good" / "000.png")
        for k in range(3):
            synthetic_image(40 + k).save(root / cls / "test" / "good" / f"00{k}.png")
            cx, cy, r = 20 + 15 * k, 30, 9
            synthetic_image(50 + k, (cx, cy, r)).save(root / cls / "test" / "broken" / f"00{k}.png")
            y, x = np.mgrid[0:80, 0:96]
            mask = (((x - cx) ** 2 + (y - cy) ** 2) < r * r).astype(np.uint8) * 255
            Image.fromarray(mask).save(root / cls / "ground_truth" / "broken" / f"00{k}_mask.png")
    out = tmp_path / "eval"
    run("eval", "--weights", setup.weights, "--root", root, "--layout", "mvtec", "--size", SIZE,
        "--backend", "cpu", "--out", out)
    shot = ROOT / "target" / "report.png"
    res = subprocess.run(["node", str(ROOT / "tests" / "browser" / "report.mjs"),
                          str(out / "report.html"), str(shot)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["console_errors"] == []
    assert seen["curves"] == 2 * 5 and seen["images"] >= 2 * 3
    assert shot.is_file() and shot.stat().st_size > 10_000
