"""KV-cache throughput: the Engine's static cache (write + read views) vs upstream-style torch.cat growth.

One "generation" walks the VAR-256 scale schedule (patch_nums 1..16, L=680 tokens): for every scale
and every layer it appends that scale's K/V and reads back K/V up to the new length (what attention
consumes). Prints a table and optionally writes JSON (``--out``).

    python bench/bench_kv_cache.py --layers 4 --batch 4 --out bench/results/kv_cache.json
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict, List

import torch

from ssg_engine import kv_cache

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cat(args, kvs: List[torch.Tensor]) -> None:
    """Upstream VAR: per layer, cached_k = torch.cat((cached_k, k), dim=2)."""
    cached_k: List[torch.Tensor] = [None] * args.layers  # type: ignore[list-item]
    cached_v: List[torch.Tensor] = [None] * args.layers  # type: ignore[list-item]
    for x in kvs:
        for layer in range(args.layers):
            if cached_k[layer] is None:
                cached_k[layer], cached_v[layer] = x, x
            else:
                cached_k[layer] = torch.cat((cached_k[layer], x), dim=2)
                cached_v[layer] = torch.cat((cached_v[layer], x), dim=2)


def make_run_static(cache) -> Callable[[argparse.Namespace, List[torch.Tensor]], None]:
    """The Engine's StaticKVCache: per scale and layer, write at the running length, then read views up to it."""

    def run(args, kvs: List[torch.Tensor]) -> None:
        length = 0
        for x in kvs:
            for layer in range(args.layers):
                cache.write(layer, length, x, x)
                cache.read(layer, args.batch, length + x.shape[2])
            length += x.shape[2]

    return run


def bench(fn, args, kvs, device) -> float:
    for _ in range(args.warmup):
        fn(args, kvs)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn(args, kvs)
    _sync(device)
    return (time.perf_counter() - t0) / args.iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="sequences (count both CFG halves)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", help="write results as JSON here")
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    max_len = sum(pn * pn for pn in PATCH_NUMS)
    kvs = [torch.randn(args.batch, args.heads, pn * pn, args.head_dim, dtype=dtype, device=device) for pn in PATCH_NUMS]

    impls: Dict[str, Callable] = {"torch.cat": run_cat}
    shape = (args.layers, args.batch, args.heads, max_len, args.head_dim)
    if kv_cache.extension_available():
        impls["static (C++)"] = make_run_static(kv_cache.StaticKVCache(*shape, dtype, device))
    impls["static (PyTorch)"] = make_run_static(kv_cache.PyStaticKVCache(*shape, dtype, device))

    results = {name: bench(fn, args, kvs, device) for name, fn in impls.items()}
    tokens = args.batch * max_len * args.layers
    print(f"device={device} dtype={args.dtype} layers={args.layers} batch={args.batch} heads={args.heads} "
          f"head_dim={args.head_dim} L={max_len}")
    print(f"{'impl':<16}{'ms/generation':>16}{'M tok-layer/s':>16}{'vs cat':>10}")
    for name, sec in results.items():
        print(f"{name:<16}{sec * 1e3:>16.3f}{tokens / sec / 1e6:>16.2f}{results['torch.cat'] / sec:>9.2f}x")
    if args.out:
        record = {"config": vars(args) | {"max_len": max_len, "torch": torch.__version__},
                  "ms_per_generation": {k: v * 1e3 for k, v in results.items()}}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
