"""``ssg-engine bench``: time sampling with the Engine or the reference sampler, optionally under torch.profiler."""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from ..params import SamplingParams
from .common import (
    UsageError, add_batch_args, add_model_args, add_sampling_args, check_output_file, int_arg, load_from_args,
    model_sampling, resolve_ssg_args, sampling_from_args,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRACE_SUFFIXES = (".json", ".json.gz")


def cmd_bench(args: argparse.Namespace) -> int:
    from ..engine import Engine
    from ..families.var.config import ModelConfig
    from ..families.var.sampler import sample_reference
    from ..files import atomic_output
    from ..loading import random_models

    if args.random and (args.var or args.vae or args.config or args.preset or args.patch_nums):
        raise UsageError("--random uses random weights of a preset: drop --var/--vae/--config/--preset/--patch-nums, or drop --random")
    if args.sampler == "reference" and args.dtype != "float32":
        raise UsageError(f"--dtype {args.dtype}: the reference sampler runs in float32 only; use --sampler engine or --dtype float32")
    if args.sampler == "reference" and args.no_graphs:
        raise UsageError("--no-graphs applies to --sampler engine only; drop it")
    if args.profile == "torch":
        args.trace = args.trace or "trace.json"
        check_output_file(args.trace, TRACE_SUFFIXES, "--trace")
    elif args.trace is not None:
        raise UsageError("--trace is written by --profile torch only; add --profile torch or drop --trace")
    resolve_ssg_args(args)
    dtype = DTYPES[args.dtype]
    params = sampling_from_args(args, SamplingParams() if args.random else model_sampling(args), args.ssg_beta)
    if args.random:
        vae, var = random_models(ModelConfig.preset(args.random), args.device, dtype)
    else:
        vae, var = load_from_args(args)
    labels = torch.arange(args.batch_size, device=args.device) % var.num_classes
    if args.sampler == "engine":
        engine = Engine(var, vae, max_batch=args.batch_size, device=args.device, dtype=dtype, cuda_graphs=not args.no_graphs)

        def run():
            engine.generate(labels, params)
    else:

        def run():
            sample_reference(var, args.batch_size, labels, params)

    cuda = str(args.device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run()  # warm-up (and graph capture)
    sync()
    if args.profile == "torch":
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=False) as prof:
            run()
            sync()
        with atomic_output(args.trace) as tmp:
            prof.export_chrome_trace(str(tmp))
            if not tmp.is_file():  # torch logs the failure and returns
                raise OSError(f"--trace {args.trace}: torch.profiler wrote no trace; see its message above, choose another path")
        print(f"wrote torch.profiler trace {args.trace}")
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    best = min(times)
    print(json.dumps({
        "sampler": args.sampler, "dtype": str(var.head.weight.dtype).removeprefix("torch."), "device": args.device,
        "batch_size": args.batch_size, "seconds_min": best, "images_per_s": args.batch_size / best,
    }))
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``bench`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser("bench", help="time sampling (optionally under torch.profiler)")
    add_model_args(p)
    add_sampling_args(p)
    add_batch_args(p, labels=False)
    p.add_argument("--random", default=None, help="use random weights of a preset (d16 ... d36) instead of checkpoints")
    p.add_argument("--sampler", choices=["engine", "reference"], default="engine")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the VAR's dtype (the reference sampler: float32 only)")
    p.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    p.add_argument("--repeats", type=int_arg(1), default=3)
    p.add_argument("--profile", choices=["none", "torch"], default="none")
    p.add_argument("--trace", default=None, help="where --profile torch writes its Chrome trace (.json or .json.gz; default trace.json)")
    p.set_defaults(func=cmd_bench)
