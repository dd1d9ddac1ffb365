"""``ssg-engine plan``: the memory one Engine batch needs (weights, KV cache, logits, activations, decode), whether it
fits a GPU and the largest batch that does, and (``--gpu``, VAR and HART) its roofline floor from the cost model,
before loading anything. VAR presets or a config JSON; Infinity presets with ``--pn`` and ``--h-div-w``; HART presets
(float16 by default, its Engine's on CUDA; ``--more-smooth/--no-more-smooth`` counts the soft inputs' Gumbel scratch or
not, default upstream's: on; the diffusion head's buffers are a line of their own)."""
from __future__ import annotations

import argparse
from typing import Any

from .bench import DTYPES
from .common import UsageError, float_arg, int_arg
from .sample import parse_pn

VAR_PRESETS = ["d16", "d20", "d24", "d30", "d36"]
PLAN_MAX_BYTES = 2**50  # 1 PiB: far above any GPU, and small enough that every planned tensor's size fits an int64


def cmd_plan(args: argparse.Namespace) -> int:
    from ..families.hart.config import PRESETS as HART_PRESETS
    from ..families.infinity.model import INFINITY_PRESETS
    from ..families.var.config import ModelConfig
    from ..memory import largest_batch
    from ..plan import GiB, plan

    infinity, hart = args.preset in INFINITY_PRESETS, args.preset in HART_PRESETS and not args.config
    if not infinity and (args.pn is not None or args.h_div_w is not None):
        raise UsageError(f"--pn/--h-div-w: Infinity presets only ({', '.join(INFINITY_PRESETS)}); VAR's and HART's scales are in their config")
    if infinity and args.gpu:
        raise UsageError("--gpu: the roofline (ssg_engine.costs) covers VAR and HART presets; drop --gpu for an Infinity preset")
    if not hart and args.more_smooth is not None:
        raise UsageError(f"--more-smooth/--no-more-smooth: HART presets only ({', '.join(HART_PRESETS)})")
    config = ModelConfig.from_json(args.config) if args.config else args.preset if infinity or hart else ModelConfig.preset(args.preset)
    family = dict(pn=parse_pn(args.pn), h_div_w=args.h_div_w or 1.0) if infinity else dict(more_smooth=args.more_smooth) if hart else {}
    dtype = DTYPES[args.dtype] if args.dtype else None if hart else DTYPES["bfloat16"]  # None: HART's Engine's
    try:
        memory = plan(config, args.batch_size, dtype, **family)
    except ValueError as e:  # an --h-div-w or --pn not in Infinity's table
        raise UsageError(f"--h-div-w/--pn: {e}") from None
    if memory.total > PLAN_MAX_BYTES:
        raise UsageError(f"--batch-size {args.batch_size}: one batch would need {memory.total / GiB:.3g} GiB, more than any GPU "
                         f"(plans stop at {PLAN_MAX_BYTES / 2**50:g} PiB); give a smaller --batch-size")
    gpu_bytes = int(args.gpu_memory * GiB) if args.gpu_memory is not None else None
    print(memory.table(gpu_bytes))
    if gpu_bytes is not None:
        print(f"largest batch that fits: {largest_batch(lambda b: plan(config, b, dtype, **family), gpu_bytes)}")
    if args.gpu:
        from ..costs import GPUS, hart_stage_costs, roofline, stage_costs

        stages = (hart_stage_costs(HART_PRESETS[config], args.batch_size, memory.dtype) if hart
                  else stage_costs(config, args.batch_size, memory.dtype))
        r = roofline(stages, GPUS[args.gpu])
        name, (_, _, seconds, compute) = max(r.by_stage().items(), key=lambda item: item[1][2])
        print(f"roofline floor on {r.gpu.name}: {r.seconds * 1e3:.2f} ms per batch ({args.batch_size / r.seconds:.1f} img/s); "
              f"largest stage: {name} ({seconds / r.seconds:.0%} of the floor, {compute / seconds:.0%} of it compute-bound)")
    return 0


def add_parsers(sub: Any) -> None:
    from ..families.hart.config import PRESETS as HART_PRESETS
    from ..families.infinity.model import INFINITY_PRESETS

    p = sub.add_parser("plan", help="memory of one Engine batch (weights, KV cache, logits, activations, decode); does it fit a GPU?")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="d16", choices=VAR_PRESETS + list(INFINITY_PRESETS) + list(HART_PRESETS),
                   help="public model (default d16)")
    g.add_argument("--config", help="VAR model config JSON instead of a preset")
    p.add_argument("--batch-size", type=int_arg(1), default=64, help="images per batch (CFG doubles the rows)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="the model's dtype (default bfloat16; VAR: the VQ-VAE decodes in it; Infinity: its linear weights "
                        "and autocast; HART: one its Engine runs at, default float16, its Engine's on CUDA)")
    p.add_argument("--more-smooth", action=argparse.BooleanOptionalAction, default=None,
                   help="HART: count more_smooth's Gumbel scratch (default: on, as upstream's release settings)")
    p.add_argument("--pn", default=None, help="Infinity: number of scales or 0.06M | 0.25M | 0.60M | 1M (default: 1M)")
    p.add_argument("--h-div-w", type=float_arg(0.1, 10.0), default=None, help="Infinity: height / width, one of its ratios (default 1.0)")
    p.add_argument("--gpu-memory", type=float_arg(0.5, 1e5), default=None,
                   help="GPU memory in GiB: say whether the batch fits, and the largest batch that does")
    p.add_argument("--gpu", choices=["h200", "h100", "a100", "rtx4090"], default=None,
                   help="VAR and HART: also print the roofline floor on this GPU (ssg_engine.costs: FLOPs and bytes per stage)")
    p.set_defaults(func=cmd_plan)
