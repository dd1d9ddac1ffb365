"""The ``ssg-engine`` command line: sample, spectrum, bench, train, eval, fid-sample, info."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--var/--vae (default: the shipped model), --config/--preset, --patch-nums, --device."""
    p.add_argument("--var", help="VAR checkpoint (.pth or .safetensors); default: the shipped Fashion-MNIST model")
    p.add_argument("--vae", help="VQ-VAE checkpoint (.pth or .safetensors)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="model config JSON (default: inferred from the checkpoints)")
    g.add_argument("--preset", help="d16 | d20 | d24 | d30 | d36")
    p.add_argument("--patch-nums", default=None, help="comma-separated scales, when the checkpoint's token count matches no preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--cfg/--top-k/--top-p (defaults per model, see ``load_from_args``), --temperature, --ssg-*."""
    p.add_argument("--cfg", type=float, default=None, help="default: 1.5 (upstream protocol); shipped model: its card's value")
    p.add_argument("--top-k", type=int, default=None, help="default: 900; shipped model: its card's value")
    p.add_argument("--top-p", type=float, default=None, help="default: 0.96; shipped model: its card's value")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ssg-beta", type=float, default=None, help="SSG strength (off when not given; --compare uses the default)")
    p.add_argument("--ssg-prior", default="dse", help="dse | bilinear | bicubic | nearest | area | none")
    p.add_argument("--ssg-interp", default="bilinear", help="DSE interpolation: bilinear | bicubic")


def _add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", nargs="+", default=None,
                   help="class labels (integers; names such as 'sneaker bag' with the shipped model); default: all classes of the shipped model, else 0 1 2 3")
    p.add_argument("--per-class", type=int, default=1, help="images per class (one grid row per class)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch; batch i uses seed + i")
    p.add_argument("--batch-size", type=int, default=16)


UPSTREAM_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}  # upstream VAR's FID protocol


def _fill_sampling_defaults(args: argparse.Namespace, defaults: dict) -> None:
    for name, value in defaults.items():
        if getattr(args, name, "absent") is None:
            setattr(args, name, value)


def load_from_args(args: argparse.Namespace):
    """(vae, var) from --var/--vae (with --config/--preset/--patch-nums), or the shipped Fashion-MNIST model.

    Sampling flags left unset get the shipped model's card settings, or upstream's protocol for checkpoints."""
    from .config import infer_config
    from .loading import load_models, read_state_dict

    if not args.var and not args.vae:
        from .pretrained import SAMPLING_DEFAULTS, load_pretrained

        _fill_sampling_defaults(args, SAMPLING_DEFAULTS)
        return load_pretrained(device=args.device)
    _fill_sampling_defaults(args, UPSTREAM_SAMPLING)
    if not args.var or not args.vae:
        raise SystemExit("error: give both --var and --vae, or neither (the shipped Fashion-MNIST model)")
    config = args.config or args.preset
    if config is None and args.patch_nums:
        var_state, vae_state = read_state_dict(args.var), read_state_dict(args.vae)
        config = infer_config(var_state, vae_state, _patch_nums(args.patch_nums))
        return load_models(var_state, vae_state, config=config, device=args.device)
    return load_models(args.var, args.vae, config=config, device=args.device)


def _patch_nums(text: Optional[str]) -> Optional[List[int]]:
    if not text:
        return None
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --patch-nums must be comma-separated integers, got {text!r}") from None


def _parse_classes(values: Optional[Sequence[str]], num_classes: int, named: bool) -> List[int]:
    """Integer labels, or Fashion-MNIST class names when ``named`` (the shipped model); default: every class."""
    if not values:
        return list(range(num_classes if named else min(4, num_classes)))
    if named:
        from .data import class_index

        try:
            return [class_index(v, num_classes) for v in values]
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    out = []
    for v in values:
        try:
            c = int(v)
        except ValueError:
            raise SystemExit(f"error: class {v!r} is not an integer label (class names work with the shipped model)") from None
        if not 0 <= c < num_classes:
            raise SystemExit(f"error: class {c} is outside [0, {num_classes})")
        out.append(c)
    return out


def _labels(args: argparse.Namespace, var) -> List[int]:
    named = not args.var and not args.vae
    classes = _parse_classes(args.classes, var.num_classes, named)
    return [c for c in classes for _ in range(args.per_class)]


def ssg_from_args(args: argparse.Namespace, beta: Optional[float]):
    from .guidance import SSG

    if beta is None:
        return None
    return SSG(beta=beta, prior=args.ssg_prior, interp=args.ssg_interp)


def _sample_all(var, vae, labels: List[int], args: argparse.Namespace, ssg, desc: str) -> torch.Tensor:
    from tqdm import tqdm

    from .sampler import generate

    chunks = [labels[i : i + args.batch_size] for i in range(0, len(labels), args.batch_size)]
    images = []
    for i, chunk in enumerate(tqdm(chunks, desc=desc, unit="batch", file=sys.stderr)):
        images.append(
            generate(
                var, vae, chunk, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                temperature=args.temperature, seed=args.seed + i, ssg=ssg,
            )
        )
    return torch.cat(images)


def cmd_sample(args: argparse.Namespace) -> int:
    from .guidance import DEFAULT_BETA
    from .imaging import make_grid, save_png, side_by_side

    if args.batch_size <= 0:
        raise SystemExit("error: --batch-size must be positive")
    if args.per_class <= 0:
        raise SystemExit("error: --per-class must be positive")
    vae, var = load_from_args(args)
    labels = _labels(args, var)
    nrow = args.per_class if args.per_class > 1 else None
    t0 = time.perf_counter()
    if args.compare:
        beta = args.ssg_beta if args.ssg_beta is not None else DEFAULT_BETA
        base = _sample_all(var, vae, labels, args, None, "baseline")
        guided = _sample_all(var, vae, labels, args, ssg_from_args(args, beta), f"SSG beta={beta:g}")
        grid = side_by_side([make_grid(base, nrow), make_grid(guided, nrow)])
        images = torch.cat([base, guided])
    else:
        images = _sample_all(var, vae, labels, args, ssg_from_args(args, args.ssg_beta), "sampling")
        grid = make_grid(images, nrow)
    dt = time.perf_counter() - t0
    if args.out:
        upscale = args.upscale or max(1, 128 // images.shape[-1])
        save_png(grid, args.out, upscale=upscale)
        print(f"wrote {args.out} ({images.shape[0]} images of {images.shape[-1]}x{images.shape[-2]}, {dt:.2f}s)")
    if args.out_dir:
        for i, img in enumerate(images):
            save_png(img, Path(args.out_dir) / f"{i:05d}.png")
        print(f"wrote {images.shape[0]} PNGs to {args.out_dir}")
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    from .analysis import plot_spectra, spectra_for
    from .guidance import DEFAULT_BETA

    vae, var = load_from_args(args)
    labels = torch.tensor(_labels(args, var), device=var.lvl_1L.device)
    beta = args.ssg_beta if args.ssg_beta is not None else DEFAULT_BETA
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    runs = {
        "baseline": spectra_for(var, labels, args.seed, None, **sampling),
        f"SSG beta={beta:g}": spectra_for(var, labels, args.seed, ssg_from_args(args, beta), **sampling),
    }
    plot_spectra(runs, args.out, title=f"latent spectra, classes {labels.tolist()}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: [vars(s) for s in v] for k, v in runs.items()}, indent=1))
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .engine import Engine
    from .loading import random_models
    from .sampler import sample_reference

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.random:
        _fill_sampling_defaults(args, UPSTREAM_SAMPLING)
        vae, var = random_models(ModelConfig.preset(args.random), args.device, dtype)
    else:
        vae, var = load_from_args(args)
    labels = torch.arange(args.batch_size, device=args.device) % var.num_classes
    ssg = ssg_from_args(args, args.ssg_beta)
    if args.sampler == "engine":
        engine = Engine(var, vae, max_batch=args.batch_size, device=args.device, dtype=dtype, cuda_graphs=not args.no_graphs)

        def run():
            engine.generate(labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed, ssg=ssg)
    else:

        def run():
            sample_reference(var, args.batch_size, labels, g_seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, ssg=ssg)

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
        prof.export_chrome_trace(args.trace)
        print(f"wrote torch.profiler trace {args.trace}")
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    best = min(times)
    print(json.dumps({"sampler": args.sampler, "batch_size": args.batch_size, "seconds_min": best, "images_per_s": args.batch_size / best}))
    return 0


VAE_FIELDS = ("V", "Cvae", "ch", "ch_mult", "num_res_blocks", "in_channels", "quant_conv_ks", "share_quant_resi", "patch_nums")


def cmd_info(args: argparse.Namespace) -> int:
    from .config import infer_config, matching_presets
    from .loading import read_state_dict

    sd = read_state_dict(args.ckpt)
    kind = "VAR" if "pos_1LC" in sd else "VQ-VAE" if "quantize.embedding.weight" in sd else None
    if kind is None:
        raise SystemExit(f"error: {args.ckpt} is neither a VAR nor a VQ-VAE state dict")
    patch = _patch_nums(args.patch_nums)
    cfg = infer_config(sd, None, patch) if kind == "VAR" else infer_config(None, sd, patch)
    n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    fields = cfg.to_dict()
    if kind == "VQ-VAE":
        fields = {k: fields[k] for k in VAE_FIELDS}
    info = {"checkpoint": str(args.ckpt), "kind": kind, "parameters_and_buffers": n_params, "config": fields}
    if kind == "VAR":
        info["matching_presets"] = matching_presets(sd)
    print(json.dumps(info, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssg-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample class-conditional images into a PNG grid")
    add_model_args(p)
    add_sampling_args(p)
    _add_batch_args(p)
    p.add_argument("--compare", action="store_true", help="baseline and SSG side by side, same seeds, one PNG")
    p.add_argument("--out", default="grid.png", help="grid PNG path")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image here")
    p.add_argument("--upscale", type=int, default=None, help="nearest-neighbour upscaling of the grid PNG (default: to about 128 px per image)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("spectrum", help="per-scale spectra of the semantic residual and sampled tokens, baseline vs SSG (PNG)")
    add_model_args(p)
    add_sampling_args(p)
    _add_batch_args(p)
    p.add_argument("--out", default="spectrum.png")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("bench", help="time sampling (optionally under torch.profiler)")
    add_model_args(p)
    add_sampling_args(p)
    _add_batch_args(p)
    p.add_argument("--random", default=None, help="use random weights of a preset (d16 ... d36) instead of checkpoints")
    p.add_argument("--sampler", choices=["engine", "reference"], default="engine")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", choices=["none", "torch"], default="none")
    p.add_argument("--trace", default="trace.json", help="where --profile torch writes its Chrome trace")
    p.set_defaults(func=cmd_bench)

    from .eval import add_eval_subparsers
    from .training import add_train_subparser

    add_train_subparser(sub)
    add_eval_subparsers(sub)

    p = sub.add_parser("info", help="print a checkpoint's inferred config and parameter count")
    p.add_argument("ckpt")
    p.add_argument("--patch-nums", default=None, help="comma-separated, when the token count matches no preset")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .loading import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CheckpointError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
