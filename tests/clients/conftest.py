"""Shared set-up for the client tests: the release binary, synthetic weights and images, a
model repository with a calibrated product, an uncalibrated one and two broken folders,
reference maps from `metauas segment`, and servers started and stopped per test module.

Everything runs against the real `metauas` binary (`METAUAS_BIN`, default
target/release/metauas) on loopback ports.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("METAUAS_BIN", ROOT / "target" / "release" / "metauas"))
SIZE = 64
FRAME = (96, 80)  # width, height of every test image


def run(*args, check=True):
    out = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"metauas {' '.join(map(str, args))} failed:\n{out.stderr}")
    return out


def synthetic_image(seed, defect=None):
    """A smooth picture with texture and an optional bright disc (x, y, r)."""
    rng = np.random.default_rng(seed)
    w, h = FRAME
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([
        90 + 60 * np.sin(x / 13 + seed) * np.cos(y / 17),
        120 + 40 * np.cos(x / 9 - y / 21),
        100 + 50 * np.sin((x + y) / 15 + seed / 3),
    ], axis=-1)
    img = base + rng.normal(0, 6, size=base.shape)
    if defect:
        cx, cy, r = defect
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = [250, 40, 30]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `metauas serve`; its stderr is collected; stopped by `stop` or `kill`."""

    def __init__(self, *args, port=None, env=None):
        bind = f"127.0.0.1:{port or 0}"
        self.args = ["serve", "--size", SIZE, "--backend", "cpu", "--bind", bind, *args]
        self.env = env
        self.log = []
        self.proc = subprocess.Popen([str(BIN), *map(str, self.args)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                m = re.match(r"metauas: listening on http://(\S+)", line)
                if m:
                    self.addr = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or not hasattr(self, "addr"):
            self.kill()
            raise AssertionError("server did not start:\n" + "\n".join(self.log))
        self.url = f"http://{self.addr}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)


class Setup:
    def __init__(self, tmp: Path):
        self.dir = tmp
        self.weights = tmp / "weights.safetensors"
        run("synth-weights", "--out", self.weights, "--seed", 3)
        self.normal = tmp / "normal"
        self.calib = tmp / "calib"
        self.queries = tmp / "queries"
        for d in (self.normal, self.calib, self.queries):
            d.mkdir()
        for s in (1, 2):
            synthetic_image(s).save(self.normal / f"good{s}.png")
        for s in range(10, 20):
            synthetic_image(s).save(self.calib / f"n{s}.png")
        self.query_files = []
        for k in range(6):
            defect = (20 + 10 * k, 30 + 4 * k, 8 + k) if k % 2 else None
            path = self.queries / f"q{k}.png"
            synthetic_image(30 + k, defect).save(path)
            self.query_files.append(path)
        # The repository: bottle (calibrated), cable (not), broken and empty folders.
        self.repo = tmp / "repo"
        for name in ("bottle", "cable"):
            (self.repo / name / "1").mkdir(parents=True)
        bottle = self.repo / "bottle" / "1" / "bank.safetensors"
        run("bank", "build", "--weights", self.weights, "--images", self.normal, "--out", bottle,
            "--size", SIZE, "--backend", "cpu")
        run("bank", "calibrate", "--weights", self.weights, "--bank", bottle, "--images",
            self.calib, "--size", SIZE, "--backend", "cpu")
        run("bank", "build", "--weights", self.weights, "--images", self.normal / "good1.png",
            "--out", self.repo / "cable" / "1" / "bank.safetensors", "--size", SIZE,
            "--backend", "cpu")
        (self.repo / "broken" / "1").mkdir(parents=True)
        (self.repo / "broken" / "1" / "bank.safetensors").write_bytes(b"not a bank")
        (self.repo / "empty").mkdir()
        self.reference = self.references(self.latest_bank(self.repo, "bottle"), "bottle")

    def references(self, bank, tag):
        """`metauas segment`'s maps (model size, .npy) and JSON lines for the queries."""
        out = self.dir / f"ref-{tag}"
        res = run("segment", "--weights", self.weights, "--bank", bank, "--query", self.queries,
                  "--size", SIZE, "--backend", "cpu", "--no-images", "--out", out)
        lines = [json.loads(l) for l in res.stdout.splitlines()]
        return {Path(l["query"]).name: (np.load(l["map"]), l) for l in lines}

    @staticmethod
    def latest_bank(repo, product):
        versions = [int(p.name) for p in (repo / product).iterdir() if p.name.isdigit()]
        return repo / product / str(max(versions)) / "bank.safetensors"

    def repo_copy(self, tag):
        """A private copy of the repository, for a test module that writes to it."""
        dst = self.dir / f"repo-{tag}"
        shutil.copytree(self.repo, dst)
        return dst


@pytest.fixture(scope="session")
def setup():
    tmp = Path(tempfile.mkdtemp(prefix="metauas-clients-"))
    yield Setup(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(setup, request):
    repo = setup.repo_copy(request.module.__name__)
    s = Server("--weights", setup.weights, "--model-repository", repo, "--poll-s", "1")
    s.repo = repo
    yield s
    s.stop()
