"""The deployment files in deploy/ against the real binary. No cluster exists here, so each
manifest's container is started exactly as the manifest says (command, args, env, port),
with /mnt/models standing for the mounted repository, and every probe path and the
Prometheus scrape location must answer 200."""

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, run

DEPLOY = ROOT / "deploy"
MOUNT = "/mnt/models"
IMAGE_BINARY = "/usr/local/bin/metauas"


def mounted_repository(setup, tag, argv):
    """What the volume would hold: weights at the root and a product built at the size the
    container runs at."""
    size = argv[argv.index("--size") + 1] if "--size" in argv else "256"
    repo = setup.dir / f"mount-{re.sub(r'[^A-Za-z0-9]+', '-', tag)}"
    (repo / "bottle" / "1").mkdir(parents=True)
    shutil.copy(setup.weights, repo / "weights.safetensors")
    run("bank", "build", "--weights", setup.weights, "--images", setup.normal, "--size", size,
        "--backend", "cpu", "--out", repo / "bottle" / "1" / "bank.safetensors")
    return repo


def substitute(args, repo):
    out = []
    for a in args:
        a = str(a)
        if a == IMAGE_BINARY:
            a = str(BIN)
        out.append(a.replace(MOUNT, str(repo)))
    return out


def start(argv, env):
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            log.append(line)
            if "listening on" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(180) or proc.poll() is not None:
        proc.kill()
        raise AssertionError("did not start:\n" + "".join(log))
    return proc


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def manifests():
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def containers(doc):
    spec = doc.get("spec", {})
    if doc["kind"] == "ClusterServingRuntime":
        return spec["containers"], {}
    if doc["kind"] == "Deployment":
        pod = spec["template"]
        return pod["spec"]["containers"], pod["metadata"].get("annotations", {})
    return [], {}


def check_container(setup, c, annotations, tag):
    raw = [str(a) for a in c.get("command", []) + c.get("args", [])]
    repo = mounted_repository(setup, tag, raw)
    argv = substitute(raw, repo)
    env = {e["name"]: str(e["value"]) for e in c.get("env", [])}
    ports = [p["containerPort"] for p in c["ports"]]
    bind = argv[argv.index("--bind") + 1]
    assert int(bind.rsplit(":", 1)[1]) in ports, f"{tag}: --bind {bind} is not a containerPort"
    proc = start(argv, env)
    try:
        for probe in ("readinessProbe", "livenessProbe"):
            h = c[probe]["httpGet"]
            status, _ = get(h["port"], h["path"])
            assert status == 200, f"{tag}: {probe} {h['path']}"
        if annotations.get("prometheus.io/scrape") == "true":
            status, text = get(annotations["prometheus.io/port"], annotations["prometheus.io/path"])
            assert status == 200 and "metauas_requests_total" in text
        # The repository behind the mount is served.
        status, body = get(ports[0], "/v2/models/bottle/ready")
        assert status == 200
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, f"{tag}: did not stop cleanly on SIGTERM"


def test_kubernetes_and_kserve_manifests(setup):
    seen = {}
    for path, doc in manifests():
        seen.setdefault(doc["kind"], []).append(doc)
        cs, annotations = containers(doc)
        for c in cs:
            check_container(setup, c, annotations, f"{path.name}:{doc['kind']}")
    assert {"ClusterServingRuntime", "InferenceService", "Deployment", "Service",
            "HorizontalPodAutoscaler"} <= set(seen)
    runtime = seen["ClusterServingRuntime"][0]
    assert "v2" in runtime["spec"]["protocolVersions"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    isvc = seen["InferenceService"][0]["spec"]["predictor"]["model"]
    assert isvc["modelFormat"]["name"] in formats and isvc["runtime"] == runtime["metadata"]["name"]
    ann = seen["InferenceService"][0]["metadata"]["annotations"]
    assert ann["prometheus.io/path"] == "/metrics"
    svc = seen["Service"][0]["spec"]["ports"][0]
    assert svc["targetPort"] == 8080
    hpa = seen["HorizontalPodAutoscaler"][0]["spec"]["scaleTargetRef"]
    assert hpa["name"] == seen["Deployment"][0]["metadata"]["name"]


def test_dockerfile_command_and_healthcheck(setup):
    text = (DEPLOY / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", final, re.M).group(1))
    expose = int(re.search(r"^EXPOSE (\d+)$", final, re.M).group(1))
    health = re.search(r"curl -fsS (http://127\.0\.0\.1:(\d+)(/\S*))", final)
    assert re.search(r"^USER \d+$", final, re.M), "the image must not run as root"
    assert "cargo build --release --locked" in text
    assert int(health.group(2)) == expose
    repo = mounted_repository(setup, "docker", entry + cmd)
    proc = start(substitute(entry + cmd, repo), {})
    try:
        status, _ = get(expose, health.group(3))
        assert status == 200
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
