"""``ssg-engine plan``: the memory one Engine batch needs (weights, KV cache, logits, activations, decode), whether it
fits a GPU, and (``--gpu``) its roofline floor from the cost model, before loading anything."""
from __future__ import annotations

import argparse
from typing import Any

from .bench import DTYPES
from .common import UsageError, float_arg, int_arg

PLAN_MAX_BYTES = 2**50  # 1 PiB: far above any GPU, and small enough that every planned tensor's size fits an int64


def cmd_plan(args: argparse.Namespace) -> int:
    from ..config import ModelConfig
    from ..plan import GiB, plan

    config = ModelConfig.from_json(args.config) if args.config else ModelConfig.preset(args.preset)
    gpu_bytes = int(args.gpu_memory * GiB) if args.gpu_memory is not None else None
    dtype = DTYPES[args.dtype]
    batch = plan(config, args.batch_size, dtype)
    if batch.total > PLAN_MAX_BYTES:
        raise UsageError(f"--batch-size {args.batch_size}: one batch would need {batch.total / GiB:.3g} GiB, more than any GPU "
                         f"(plans stop at {PLAN_MAX_BYTES / 2**50:g} PiB); give a smaller --batch-size")
    print(batch.table(gpu_bytes))
    if args.gpu:
        from ..costs import GPUS, roofline, stage_costs

        r = roofline(stage_costs(config, args.batch_size, dtype), GPUS[args.gpu])
        name, (_, _, seconds, compute) = max(r.by_stage().items(), key=lambda item: item[1][2])
        print(f"roofline floor on {r.gpu.name}: {r.seconds * 1e3:.2f} ms per batch ({args.batch_size / r.seconds:.1f} img/s); "
              f"largest stage: {name} ({seconds / r.seconds:.0%} of the floor, {compute / seconds:.0%} of it compute-bound)")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("plan", help="memory of one Engine batch (weights, KV cache, logits, activations, decode); does it fit a GPU?")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="d16", choices=["d16", "d20", "d24", "d30", "d36"], help="public model (default d16)")
    g.add_argument("--config", help="model config JSON instead of a preset")
    p.add_argument("--batch-size", type=int_arg(1), default=64, help="images per batch (CFG doubles the rows)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="the VAR's dtype (the VQ-VAE decodes in float32)")
    p.add_argument("--gpu-memory", type=float_arg(0.5, 1e5), default=None, help="GPU memory in GiB: say whether the batch fits")
    p.add_argument("--gpu", choices=["h200", "h100", "a100", "rtx4090"], default=None,
                   help="also print the roofline floor on this GPU (ssg_engine.costs: FLOPs and bytes per stage)")
    p.set_defaults(func=cmd_plan)
