"""End-to-end sampling throughput: upstream-style eager loop vs Engine (no graphs) vs Engine (CUDA graphs).

GPU: VAR-d16 and VAR-d30 shapes with random bf16 weights, B in {1, 16, 64}, cfg 1.5, top-k 900,
top-p 0.96, SSG off and on; images/s end to end (transformer + VAE decode) and transformer only
(end to end minus a separately timed VAE decode of the same batch), against the analytic floor
(FLOPs at the measured bf16 matmul rate vs bytes of weights + KV cache at the measured copy bandwidth,
per scale). CPU (``--smoke``): the golden tiny model, no speed claims.

    python bench/bench_e2e.py --out bench/results/e2e.json                 # GPU
    python bench/bench_e2e.py --smoke --out /tmp/e2e_smoke.json            # CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_info import environment  # noqa: E402

from ssg_engine import SSG, ModelConfig, load_models, random_models, sample_reference  # noqa: E402
from ssg_engine.engine import Engine  # noqa: E402

GOLDEN_TINY = Path(__file__).resolve().parents[1] / "tests" / "golden" / "var_tiny"


def timed(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool) -> float:
    """Median wall seconds of ``fn``, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def analytic_floor(cfg: ModelConfig, B: int, flops_per_s: float, bytes_per_s: float, dtype_bytes: int = 2) -> Dict[str, float]:
    """Lower bound on transformer time per batch: per scale max(FLOPs / rate, bytes / bandwidth), summed.

    FLOPs: 2 * (linear weights) * tokens + 4 * l * L_seen * C per layer (QK^T and PV), for 2B rows (CFG).
    Bytes: all transformer weights once per scale + the KV cache read per layer per scale + logits written.
    """
    C, D = cfg.embed_dim, cfg.depth
    hidden = round(C * cfg.mlp_ratio)
    per_block = 3 * C * C + C * C + 2 * C * hidden + (0 if cfg.shared_aln else 6 * C * C)
    linear = D * per_block + C * cfg.V + cfg.Cvae * C + 2 * C * C
    total, seen, flops_all, bytes_all = 0.0, 0, 0.0, 0.0
    for pn in cfg.patch_nums:
        l = pn * pn
        seen += l
        rows = 2 * B * l
        flops = 2 * linear * rows + D * 4 * rows * seen * C
        nbytes = linear * dtype_bytes + D * 2 * (2 * B) * seen * C * dtype_bytes + B * l * cfg.V * 4
        total += max(flops / flops_per_s, nbytes / bytes_per_s)
        flops_all += flops
        bytes_all += nbytes
    return {"seconds": total, "images_per_s": B / total, "tflop": flops_all / 1e12, "gbytes": bytes_all / 1e9}


def measure_rates(device: str) -> Dict[str, float]:
    """Measured bf16 matmul FLOP/s and device copy bandwidth (bytes read + written per second)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timed(lambda: a @ a, 10, 3, True)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    tc = timed(lambda: y.copy_(x), 10, 3, True)
    return {"bf16_matmul_tflops": 2 * 8192**3 / t / 1e12, "copy_gbytes_per_s": 2 * x.numel() / tc / 1e9}


def bench_model(name: str, vae, var, batches: List[int], device: str, repeats: int, warmup: int, rates) -> List[dict]:
    cuda = device.startswith("cuda")
    rows = []
    engines = {
        "engine_eager": Engine(var, vae, max_batch=max(batches), device=device, dtype=var.head.weight.dtype, cuda_graphs=False),
    }
    if cuda:
        engines["engine_graphs"] = Engine(var, vae, max_batch=max(batches), device=device, dtype=var.head.weight.dtype, cuda_graphs=True)
    top_k = min(900, var.V)
    for B in batches:
        labels = torch.arange(B, device=device) % var.num_classes
        f_hat = torch.randn(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1], device=device)
        decode_s = timed(lambda: vae.fhat_to_img(f_hat), repeats, warmup, cuda)
        for ssg_name, ssg in (("off", None), ("on", SSG(beta=0.5))):
            runs = {
                "upstream_eager": lambda: sample_reference(var, B, labels, g_seed=0, cfg=1.5, top_k=top_k, top_p=0.96, ssg=ssg),
            }
            for ename, eng in engines.items():
                runs[ename] = lambda eng=eng: eng.generate(labels, cfg=1.5, top_k=top_k, top_p=0.96, seed=0, ssg=ssg)
            for method, fn in runs.items():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and method == "upstream_eager"):
                    s = timed(fn, repeats, warmup, cuda)
                row = {
                    "model": name, "B": B, "ssg": ssg_name, "method": method, "seconds": s,
                    "images_per_s": B / s, "transformer_only_images_per_s": B / max(s - decode_s, 1e-9), "decode_seconds": decode_s,
                }
                if rates:
                    floor = analytic_floor(var.config, B, rates["bf16_matmul_tflops"] * 1e12, rates["copy_gbytes_per_s"] * 1e9)
                    row["floor_images_per_s"] = floor["images_per_s"]
                    row["fraction_of_floor"] = row["transformer_only_images_per_s"] / floor["images_per_s"]
                rows.append(row)
                print(f"{name:6s} B={B:3d} ssg={ssg_name:3s} {method:15s} {s * 1e3:10.2f} ms {B / s:10.2f} img/s"
                      + (f"  floor {row['floor_images_per_s']:.1f} img/s ({row['fraction_of_floor']:.1%})" if rates else ""), flush=True)
    return rows


def summarize(rows: List[dict]) -> Dict[str, float]:
    """Speedups of graphs vs upstream eager, and SSG overhead, per (model, B)."""
    out = {}
    get = {(r["model"], r["B"], r["ssg"], r["method"]): r["seconds"] for r in rows}
    for (model, B, ssg, method), s in get.items():
        if method == "upstream_eager" and ssg == "off":
            for m in ("engine_eager", "engine_graphs"):
                if (model, B, "off", m) in get:
                    out[f"{model}_B{B}_{m}_speedup_vs_upstream"] = s / get[(model, B, "off", m)]
        if ssg == "off" and (model, B, "on", method) in get:
            out[f"{model}_B{B}_{method}_ssg_overhead"] = get[(model, B, "on", method)] / s - 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="d16,d30")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test on the golden tiny model (no speed claims)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    rows, rates = [], None
    if cuda:
        rates = measure_rates(device)
        print(f"measured: {rates}")
        for name in args.models.split(","):
            vae, var = random_models(ModelConfig.preset(name), device, torch.bfloat16)
            rows += bench_model(name, vae, var, [int(b) for b in args.batches.split(",")], device, args.repeats, args.warmup, rates)
            del vae, var
            torch.cuda.empty_cache()
    else:
        vae, var = load_models(GOLDEN_TINY / "var.pth", GOLDEN_TINY / "vae.pth", config=GOLDEN_TINY / "config.json")
        rows += bench_model("tiny", vae, var, [1, 4], device, 2, 1, None)
    report = {"smoke": not cuda, "environment": environment(), "rates": rates, "rows": rows, "summary": summarize(rows)}
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
