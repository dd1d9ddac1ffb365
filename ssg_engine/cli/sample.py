"""``ssg-engine sample`` (a PNG grid, optionally baseline and SSG side by side) and ``ssg-engine spectrum``."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, List

import torch

from ..guidance import DEFAULT_BETA
from ..params import SamplingParams
from .common import (
    INT64_MAX, UsageError, add_batch_args, add_model_args, add_sampling_args, check_output_dir, check_output_file,
    int_arg, labels_from_args, load_from_args, model_sampling, resolve_ssg_args, sampling_from_args,
)

UPSCALE_MAX = 64  # a 32 px image upscaled 64x is 2048 px; more only makes huge PNGs
PNG = (".png",)


def sample_batches(var, vae, labels: List[int], params: SamplingParams, batch_size: int, desc: str) -> torch.Tensor:
    """Images for ``labels`` in batches of ``batch_size``; batch ``i`` uses seed ``params.seed + i``."""
    from tqdm import tqdm

    from ..api import generate

    chunks = [labels[i : i + batch_size] for i in range(0, len(labels), batch_size)]
    images = []
    with tqdm(chunks, desc=desc, unit="batch", file=sys.stderr) as bar:  # closed (its last line drawn) before an error is reported
        for i, chunk in enumerate(bar):
            images.append(generate(var, vae, chunk, params, seed=params.seed + i))
    return torch.cat(images)


def cmd_sample(args: argparse.Namespace) -> int:
    from ..imaging import make_grid, save_png, side_by_side

    check_output_file(args.out, PNG, "--out")
    if args.out_dir is not None:
        check_output_dir(args.out_dir, "--out-dir")
    resolve_ssg_args(args)
    beta = DEFAULT_BETA if args.compare and args.ssg_beta is None else args.ssg_beta
    params = sampling_from_args(args, model_sampling(args), beta)
    vae, var = load_from_args(args)
    labels = labels_from_args(args, var.num_classes)
    last_seed = params.seed + math.ceil(len(labels) / args.batch_size) - 1
    if last_seed > INT64_MAX:
        raise UsageError(f"--seed {params.seed}: the last batch's seed {last_seed} passes 2**63 - 1; give a smaller --seed")
    nrow = args.per_class if args.per_class > 1 else None
    t0 = time.perf_counter()
    if args.compare:
        base = sample_batches(var, vae, labels, params.replace(ssg=None), args.batch_size, "baseline")
        guided = sample_batches(var, vae, labels, params, args.batch_size, f"SSG beta={beta:g}")
        grid = side_by_side([make_grid(base, nrow), make_grid(guided, nrow)])
        images = torch.cat([base, guided])
    else:
        images = sample_batches(var, vae, labels, params, args.batch_size, "sampling")
        grid = make_grid(images, nrow)
    dt = time.perf_counter() - t0
    upscale = args.upscale or max(1, 128 // images.shape[-1])
    save_png(grid, args.out, upscale=upscale)
    print(f"wrote {args.out} ({images.shape[0]} images of {images.shape[-1]}x{images.shape[-2]}, {dt:.2f}s)")
    if args.out_dir:
        for i, img in enumerate(images):
            save_png(img, Path(args.out_dir) / f"{i:05d}.png")
        print(f"wrote {images.shape[0]} PNGs to {args.out_dir}")
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    from ..analysis import plot_spectra, spectra_for
    from ..files import atomic_output

    check_output_file(args.out, PNG, "--out")
    if args.json is not None:
        check_output_file(args.json, (".json",), "--json")
    resolve_ssg_args(args)
    beta = args.ssg_beta if args.ssg_beta is not None else DEFAULT_BETA
    guided = sampling_from_args(args, model_sampling(args), beta)
    vae, var = load_from_args(args)
    labels = torch.tensor(labels_from_args(args, var.num_classes), device=var.lvl_1L.device)
    filters = dict(cfg=guided.cfg, top_k=guided.top_k, top_p=guided.top_p, temperature=guided.temperature)
    runs = {
        "baseline": spectra_for(var, labels, guided.seed, None, **filters),
        f"SSG beta={beta:g}": spectra_for(var, labels, guided.seed, guided.ssg, **filters),
    }
    with atomic_output(args.out) as tmp:
        plot_spectra(runs, tmp, title=f"latent spectra, classes {labels.tolist()}")
    print(f"wrote {args.out}")
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps({k: [vars(s) for s in v] for k, v in runs.items()}, indent=1))
        print(f"wrote {args.json}")
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``sample`` and ``spectrum`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser("sample", help="sample class-conditional images into a PNG grid")
    add_model_args(p)
    add_sampling_args(p)
    add_batch_args(p)
    p.add_argument("--compare", action="store_true", help="baseline and SSG side by side, same seeds, one PNG")
    p.add_argument("--out", default="grid.png", help="grid PNG path (missing folders are created)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image here (created if missing)")
    p.add_argument("--upscale", type=int_arg(1, UPSCALE_MAX), default=None,
                   help=f"nearest-neighbour upscaling of the grid PNG, 1..{UPSCALE_MAX} (default: to about 128 px per image)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("spectrum", help="per-scale spectra of the semantic residual and sampled tokens, baseline vs SSG (PNG)")
    add_model_args(p)
    add_sampling_args(p)
    add_batch_args(p, batching=False)
    p.add_argument("--out", default="spectrum.png", help="plot PNG path (missing folders are created)")
    p.add_argument("--json", default=None, help="also write the numbers to this .json file")
    p.set_defaults(func=cmd_spectrum)
