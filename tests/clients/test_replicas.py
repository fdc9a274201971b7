"""Several replicas, one repository, a real load balancer (Debian's nginx): a product
registered through one replica is served by all within --poll-s; under a few hundred
requests one replica is killed (SIGKILL) and another restarted (SIGTERM): every request gets
a correct answer, the repository stays intact and the restarted replica serves every product.
Prints throughput and p50/p99 latency through the balancer with 1 and 3 replicas (also
written to target/replicas.json)."""

import http.client
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SIZE, Server, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
POLL_S = 1


class Nginx:
    def __init__(self, upstreams):
        self.prefix = Path(tempfile.mkdtemp(prefix="metauas-nginx-"))
        os.chmod(self.prefix, 0o777)  # workers may run as another user
        self.port = free_port()
        servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstreams)
        temp = " ".join(f"{k}_temp_path {self.prefix}/{k};" for k in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.prefix / "nginx.conf").write_text(f"""
worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  {temp}
  client_max_body_size 64m;
  upstream metauas {{
{servers}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://metauas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # Inference POSTs are safe to repeat: retry them on another replica.
      proxy_next_upstream error timeout http_502 http_503 non_idempotent;
      proxy_next_upstream_tries 3;
      proxy_connect_timeout 1s;
      proxy_read_timeout 60s;
    }}
  }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                                      "-g", "daemon off;"], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/live", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("nginx did not start: " + (self.prefix / "error.log").read_text())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)
        shutil.rmtree(self.prefix, ignore_errors=True)


def binary_infer_body(png: bytes):
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(png) + 4}}],
        "outputs": [{"name": "anomaly_map", "parameters": {"binary_data": True}},
                    {"name": "score", "parameters": {"binary_data": True}}],
    }).encode()
    return header, header + len(png).to_bytes(4, "little") + png


def infer(port, model, png):
    """One binary request; returns (status, map or error text, seconds)."""
    header, body = binary_infer_body(png)
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        data = resp.read()
        took = time.perf_counter() - start
        if resp.status != 200:
            return resp.status, data.decode(errors="replace"), took
        n = int(resp.getheader("Inference-Header-Content-Length"))
        meta = json.loads(data[:n])
        size = meta["outputs"][0]["parameters"]["binary_data_size"]
        m = np.frombuffer(data[n:n + size], dtype="<f4").reshape(SIZE, SIZE)
        return 200, m, took
    except OSError as e:
        return 0, str(e), time.perf_counter() - start
    finally:
        conn.close()


def wait_ready(url, model, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{model}/ready", timeout=2) as r:
                if r.status == 200:
                    return time.time()
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{model} never became ready on {url}")


def load(port, jobs, threads=8, events=None):
    """Runs `jobs` (model, query name, png) through `port`; returns [(ok, seconds)]."""
    done = [0]
    lock = threading.Lock()

    def one(job):
        model, name, png, want = job
        status, got, took = infer(port, model, png)
        with lock:
            done[0] += 1
            k = done[0]
        for at, action in (events or {}).items():
            if k == at:
                action()
        ok = status == 200 and np.array_equal(got, want)
        return ok, took, (status, name, got if status != 200 else "")

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, jobs))


def figures(results, wall):
    lat = sorted(t for _, t, _ in results)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3
    return {"requests": len(results), "throughput_rps": round(len(results) / wall, 1),
            "p50_ms": round(q(0.50), 1), "p99_ms": round(q(0.99), 1)}


@pytest.mark.skipif(not os.path.exists(NGINX) and not os.environ.get("METAUAS_REQUIRE_NGINX"),
                    reason="nginx is not installed (apt-get install nginx)")
def test_three_replicas_behind_nginx(setup):
    repo = setup.repo_copy("replicas")
    ports = [free_port() for _ in range(3)]
    args = ("--weights", setup.weights, "--model-repository", repo, "--poll-s", POLL_S,
            "--shutdown-grace-s", "20")
    replicas = [Server(*args, port=p) for p in ports]
    balancer = Nginx(ports)
    try:
        # A product registered through one replica is served by all within --poll-s.
        req = urllib.request.Request(replicas[0].url + "/v1/products/lineb/prompts",
                                     data=(setup.normal / "good2.png").read_bytes(), method="POST")
        with urllib.request.urlopen(req) as r:
            assert r.status == 201
        registered = time.time()
        lags = [wait_ready(s.url, "lineb", POLL_S + 5) - registered for s in replicas]
        assert max(lags) <= POLL_S + 1.0, lags

        refs = {name: (m, p.read_bytes()) for p in setup.query_files
                for name, (m, _) in [(p.name, setup.reference[p.name])]}
        jobs = [("bottle", n, png, m) for n, (m, png) in refs.items()] * 50  # 300 requests

        def restart_third():
            replicas[2].stop()
            replicas[2] = Server(*args, port=ports[2])

        events = {100: lambda: replicas[1].kill(), 200: restart_third}
        start = time.perf_counter()
        results = load(balancer.port, jobs, events=events)
        wall = time.perf_counter() - start
        failed = [info for ok, _, info in results if not ok]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
        faults = figures(results, wall)

        # The repository is intact and the restarted replica serves every product.
        with urllib.request.urlopen(replicas[2].url + "/v2/repository/index", data=b"{}") as r:
            index = {e["name"]: e for e in json.load(r)}
        for name in ("bottle", "cable", "lineb"):
            assert index[name]["state"] == "READY", index[name]
            wait_ready(replicas[2].url, name, 5)
        for product in ("bottle", "cable", "lineb"):
            for version in (repo / product).iterdir():
                assert version.name.isdigit(), f"left in the repository: {version}"
                assert (version / "bank.safetensors").is_file()
        replicas[1] = Server(*args, port=ports[1])

        # Throughput and latency through the balancer: 3 replicas, then 1.
        bench = jobs[:120]
        start = time.perf_counter()
        three = figures(load(balancer.port, bench), time.perf_counter() - start)
        balancer.stop()
        balancer = Nginx(ports[:1])
        start = time.perf_counter()
        one = figures(load(balancer.port, bench), time.perf_counter() - start)
        report = {"size": SIZE, "cpus": os.cpu_count(), "clients": 8, "with_faults_3_replicas": faults,
                  "3_replicas": three, "1_replica": one, "poll_lag_s": [round(l, 2) for l in lags]}
        print("\nreplicas:", json.dumps(report))
        (ROOT / "target").mkdir(exist_ok=True)
        (ROOT / "target" / "replicas.json").write_text(json.dumps(report, indent=1))
    finally:
        balancer.stop()
        for s in replicas:
            s.kill()
