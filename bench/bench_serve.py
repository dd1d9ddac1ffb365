"""A bounded load test of ``ssg-engine serve`` on loopback: the shipped class-conditional model on CPU.

It starts ``ssg-engine serve --family var --port 0`` (a child process, 127.0.0.1 only), then:

* served: ``--clients`` concurrent clients send ``--requests`` requests (random class, random seed, ``--n`` images
  each, the model card's settings) as fast as answers come back; latency p50 / p99 and images/s;
* one at a time: one client sends ``--single`` such requests in turn (a batch of one each): images/s;
* checks every served response: status 200, ``--n`` PNGs, and each equal to ``generate(var, vae, [label] * n,
  seed=s, seeding="row")`` for that request alone (run here, after the load): lost = not 200 / no answer, wrong =
  another seed, or pixels more than one uint8 step apart (or over 0.1% of them one step apart: the same draws decoded
  in a larger float32 batch may round a few values the other way; ``pixel_exact`` counts the identical ones).

The result (with the served run's mean batch size, from the server's /metrics) goes to ``--out`` (atomically) and one Markdown row to stdout
for the README. Every request has a timeout; the server is stopped with SIGTERM (it drains) at the end.

    python -P bench/bench_serve.py --out bench/results/serve.json
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_info import environment  # noqa: E402

TIMEOUT_S = 300.0


def post(host: str, body: Dict[str, Any]) -> Tuple[int, Dict[str, Any], float]:
    """(status, answer, seconds) of one image request."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, timeout=TIMEOUT_S)
    try:
        conn.request("POST", "/v1/images/generations", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}, time.perf_counter() - start
    finally:
        conn.close()


def percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_server(args: argparse.Namespace) -> Tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-P", "-m", "ssg_engine", "serve", "--family", "var", "--device", "cpu", "--host", "127.0.0.1",
           "--port", "0", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(max(256, args.requests * args.n))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    line = ""
    while "serving" not in line:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start: {line.strip()}")
        line = proc.stderr.readline()
    return proc, line.split("http://")[1].strip().rstrip("/")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--single", type=int, default=40, help="requests of the one-at-a-time run")
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the workload (classes and request seeds)")
    ap.add_argument("--out", default="bench/results/serve.json")
    args = ap.parse_args()

    import torch

    import ssg_engine as se
    from ssg_engine.files import atomic_write
    from ssg_engine.imaging import to_uint8
    from ssg_engine.pretrained import SAMPLING, load_pretrained
    from PIL import Image

    rng = random.Random(args.seed)
    bodies = [{"model": "fashion-mnist-var", "class_labels": [rng.randrange(10)], "n": args.n, "seed": rng.randrange(2**63)}
              for _ in range(args.requests + args.single)]
    served_bodies, single_bodies = bodies[: args.requests], bodies[args.requests:]
    proc, host = start_server(args)
    try:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(post, host, b) for b in served_bodies]
            served = []
            for f in futures:
                try:
                    served.append(f.result(TIMEOUT_S))
                except Exception as e:  # a lost request (no answer)
                    served.append((0, {"error": str(e)}, float("nan")))
        served_s = time.perf_counter() - t0
        conn = http.client.HTTPConnection(host, timeout=TIMEOUT_S)
        conn.request("GET", "/metrics")  # the served run's batches (before the one-at-a-time run adds its own)
        metrics = conn.getresponse().read().decode()
        conn.close()
        t0 = time.perf_counter()
        single = [post(host, b) for b in single_bodies]
        single_s = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT_S)

    vae, var = load_pretrained()
    lost = wrong = exact = 0
    for body, (status, answer, _) in zip(served_bodies + single_bodies, served + single):
        if status != 200 or len(answer.get("data", [])) != args.n:
            lost += 1
            continue
        got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB")) for d in answer["data"]])
        want = to_uint8(se.generate(var, vae, body["class_labels"] * args.n, SAMPLING, seed=body["seed"], seeding="row"))
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        exact += int(diff.max() == 0)
        # the same draws: equal, or one uint8 step apart where the batched float32 decode rounds differently
        wrong += int(answer.get("seed") != body["seed"] or diff.max() > 1 or (diff > 0).mean() >= 1e-3)
    latencies = [s for status, _, s in served if status == 200]
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    batches = values.get("ssg_batch_size_count", 0.0)
    result = {
        "bench": "serve", "model": "fashion-mnist-var (shipped)", "device": "cpu", "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "clients": args.clients, "requests": args.requests, "images_per_request": args.n,
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "lost": lost, "wrong": wrong, "checked": len(served) + len(single), "pixel_exact": exact,
        "served": {"seconds": served_s, "images_per_s": args.requests * args.n / served_s,
                   "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99)},
        "one_at_a_time": {"requests": args.single, "seconds": single_s, "images_per_s": args.single * args.n / single_s,
                          "p50_latency_s": percentile([s for _, _, s in single], 50)},
        "served_mean_batch_size": (values.get("ssg_batch_size_sum", 0.0) / batches) if batches else None,
        "environment": environment(),
    }
    result["ratio_served_vs_one_at_a_time"] = result["served"]["images_per_s"] / result["one_at_a_time"]["images_per_s"]
    atomic_write(Path(args.out), lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    s = result["served"]
    print(f"| {args.clients} clients, {args.requests} requests x {args.n} | {lost} / {wrong} | {s['p50_latency_s'] * 1e3:.0f} / "
          f"{s['p99_latency_s'] * 1e3:.0f} ms | {s['images_per_s']:.1f} | {result['one_at_a_time']['images_per_s']:.1f} | "
          f"{result['ratio_served_vs_one_at_a_time']:.2f}x | {result['served_mean_batch_size']:.1f} |")
    return 0 if lost == 0 and wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
