#!/usr/bin/env python3
"""Latency of a running `metauas serve`: N concurrent clients, each sending K segment
requests (one keep-alive connection per client) with a real image. Python stdlib only.

    target/release/metauas serve --weights W --size 256 --bind 127.0.0.1:8080 &
    python3 tools/bench_serve.py --url http://127.0.0.1:8080 --prompt good.png \
        --query frame.png --clients 4 --requests 20

Registers the prompt (POST /v1/prompts), sends one warm-up request, then reports per request
(client-side wall time, connection reuse included): mean, p50, p90, max, the engine time the
server reports ("ms"), and the throughput of all clients together.
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse


def connect(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)


def request(conn, method, path, body=None):
    headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data)


def percentile(values, q):
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--prompt", required=True, help="normal image to register")
    ap.add_argument("--query", required=True, action="append", help="query image(s)")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--map", default="png", choices=["png", "npy", "none"])
    args = ap.parse_args()

    prompt = open(args.prompt, "rb").read()
    queries = [open(q, "rb").read() for q in args.query]
    conn = connect(args.url)
    status, v = request(conn, "POST", "/v1/prompts", prompt)
    if status != 201:
        sys.exit(f"cannot register the prompt: {status} {v}")
    path = f"/v1/segment?prompt={v['id']}&map={args.map}"
    status, v = request(conn, "POST", path, queries[0])  # warm-up
    if status != 200:
        sys.exit(f"warm-up failed: {status} {v}")
    conn.close()

    latencies, engine_ms, errors = [], [], []
    lock = threading.Lock()
    start_barrier = threading.Barrier(args.clients)

    def client(c):
        conn = connect(args.url)
        start_barrier.wait()
        for r in range(args.requests):
            body = queries[(c + r) % len(queries)]
            t0 = time.perf_counter()
            try:
                status, v = request(conn, "POST", path, body)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(repr(e))
                conn.close()
                conn = connect(args.url)
                continue
            dt = (time.perf_counter() - t0) * 1e3
            with lock:
                if status == 200:
                    latencies.append(dt)
                    engine_ms.append(v["ms"])
                else:
                    errors.append(f"{status} {v}")
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    n = len(latencies)
    print(f"clients {args.clients}, requests {args.clients * args.requests}, ok {n}, "
          f"errors {len(errors)}, map={args.map}")
    if errors:
        print("first error:", errors[0])
    if n:
        print(f"latency ms per request: mean {statistics.mean(latencies):.1f}  "
              f"p50 {percentile(latencies, 0.5):.1f}  p90 {percentile(latencies, 0.9):.1f}  "
              f"max {max(latencies):.1f}")
        print(f"engine ms per request (server 'ms'): mean {statistics.mean(engine_ms):.1f}")
        print(f"throughput: {n / wall:.2f} requests/s over {wall:.1f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
