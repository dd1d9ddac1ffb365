"""The ``ssg-engine`` command line: sample, spectrum, bench, train, eval, fid-sample, info."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, NoReturn, Optional, Sequence, Tuple

import torch


class UsageError(ValueError):
    """A bad command-line value or flag combination; the message names the flag or file and says how to fix it."""


INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# Bounds that keep the guided logits finite in float32: with |logit| ~ 1e2, CFG (<= (1 + 2|cfg|) x), SSG
# (<= (1 + 2|beta|) x) and temperature (<= 1e4 x) give at most ~4e12, far from float32's 3.4e38.
CFG_MAX = 1e3
SSG_BETA_MAX = 1e3
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-4, 1e4
UPSCALE_MAX = 64  # a 32 px image upscaled 64x is 2048 px; more only makes huge PNGs
PNG = (".png",)


def parse_int(text: str, lo: int, hi: int = INT64_MAX) -> int:
    """``text`` as an integer in ``[lo, hi]``; ``UsageError`` saying what is wanted otherwise."""
    want = f"an integer in [{lo}, {'2**63 - 1' if hi == INT64_MAX else hi}]"
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{text!r} is not an integer; give {want}") from None
    if not lo <= value <= hi:
        raise UsageError(f"{value} is out of range; give {want}")
    return value


def parse_float(text: str, lo: float, hi: float) -> float:
    """``text`` as a finite number in ``[lo, hi]``; ``UsageError`` saying what is wanted otherwise."""
    want = f"a number in [{lo:g}, {hi:g}]"
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a number; give {want}") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UsageError(f"{text} is out of range; give {want}")
    return value


def parse_floats(values: Sequence[str], flag: str, lo: float, hi: float) -> List[float]:
    """Numbers in ``[lo, hi]`` from space- and/or comma-separated ``values`` of ``flag``."""
    try:
        return [parse_float(part, lo, hi) for v in values for part in str(v).split(",") if part.strip()]
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None


def _arg_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type`` from a parser raising ``UsageError`` (argparse then names the flag)."""

    def arg(text: str) -> object:
        try:
            return parse(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return arg


def int_arg(lo: int, hi: int = INT64_MAX) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]``."""
    return _arg_type(lambda text: parse_int(text, lo, hi))


def float_arg(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[lo, hi]``."""
    return _arg_type(lambda text: parse_float(text, lo, hi))


def check_device(text: str) -> torch.device:
    """``text`` as a usable torch device (cpu, or cuda[:N] when that GPU exists); ``UsageError`` otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"{text!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{text!r} needs a CUDA GPU and none is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{text!r}: there are only {count} CUDA device(s) here; use cuda:0 .. cuda:{count - 1}")
    elif device.type != "cpu":
        raise UsageError(f"{text!r} is not supported; use cpu or cuda[:N]")
    return device


def parse_patch_nums(text: str) -> Tuple[int, ...]:
    """Comma-separated, strictly increasing positive scales, e.g. ``1,2,3,4,5,6,8``; ``UsageError`` otherwise."""
    try:
        scales = tuple(int(p) for p in text.split(","))
    except ValueError:
        scales = ()
    if not scales or scales[0] < 1 or list(scales) != sorted(set(scales)):
        raise UsageError(f"{text!r} is not a list of scales; give increasing positive integers such as 1,2,3,4,5,6,8")
    return scales


device_arg = _arg_type(lambda text: str(check_device(text)))  # kept as a string, e.g. "cuda:1"
patch_nums_arg = _arg_type(parse_patch_nums)


def _check_writable_folder(folder: Path, flag: str) -> None:
    """``folder``, or its nearest existing ancestor when it is to be created, accepts new files (tried, not guessed)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag}: {existing} is a file, so the folder {folder} cannot be created; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".ssg-engine-probe-")
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in {existing} ({e.strerror}); choose a writable folder") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str, suffixes: Sequence[str], flag: str) -> None:
    """``path`` (given as ``flag``) is a file the command may write: a known suffix, not a folder, in a writable
    folder (missing parent folders are created when it writes); ``UsageError`` otherwise."""
    if not path:
        raise UsageError(f"{flag} is empty; give a file path ending in {' or '.join(suffixes)}")
    if not path.lower().endswith(tuple(suffixes)):
        raise UsageError(f"{flag} {path}: unknown extension; give a path ending in {' or '.join(suffixes)}")
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path such as {out / ('out' + suffixes[0])}")
    _check_writable_folder(out.absolute().parent, flag)


def check_output_dir(path: str, flag: str) -> None:
    """``path`` (given as ``flag``) is a folder the command may write into (created when it writes, with its
    missing parents); ``UsageError`` otherwise."""
    if not path:
        raise UsageError(f"{flag} is empty; give a folder path")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; give a folder path")
    _check_writable_folder(out.absolute(), flag)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--var/--vae (default: the shipped model), --config/--preset/--patch-nums (checkpoints only), --device."""
    p.add_argument("--var", help="VAR checkpoint (.pth or .safetensors); default: the shipped Fashion-MNIST model")
    p.add_argument("--vae", help="VQ-VAE checkpoint (.pth or .safetensors)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="model config JSON for --var/--vae (default: inferred from the checkpoints)")
    g.add_argument("--preset", help="d16 | d20 | d24 | d30 | d36, for --var/--vae")
    g.add_argument("--patch-nums", type=patch_nums_arg, default=None,
                   help="comma-separated scales, for --var/--vae whose token count matches no preset")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--cfg/--top-k/--top-p (defaults per model, see ``load_from_args``), --temperature, --ssg-*."""
    from .guidance import DEFAULT_BETA, DSE_INTERPS, PRIORS

    p.add_argument("--cfg", type=float_arg(-CFG_MAX, CFG_MAX), default=None,
                   help=f"CFG scale, |cfg| <= {CFG_MAX:g}; default: 1.5 (upstream protocol); shipped model: its card's value")
    p.add_argument("--top-k", type=int_arg(0, INT32_MAX), default=None, help="0 disables it; default: 900; shipped model: its card's value")
    p.add_argument("--top-p", type=float_arg(0.0, 1.0), default=None, help="in [0, 1], 0 disables it; default: 0.96; shipped model: its card's value")
    p.add_argument("--temperature", type=float_arg(TEMPERATURE_MIN, TEMPERATURE_MAX), default=1.0,
                   help=f"in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}]")
    p.add_argument("--ssg-beta", type=float_arg(-SSG_BETA_MAX, SSG_BETA_MAX), default=None,
                   help=f"SSG strength, |beta| <= {SSG_BETA_MAX:g} (off when not given; --compare, --ssg-prior and --ssg-interp use {DEFAULT_BETA:g})")
    p.add_argument("--ssg-prior", choices=PRIORS, default=None, help="SSG prior (default dse); turns SSG on")
    p.add_argument("--ssg-interp", choices=DSE_INTERPS, default=None, help="DSE interpolation (default bilinear); turns SSG on")


def resolve_ssg_args(args: argparse.Namespace) -> None:
    """--ssg-prior/--ssg-interp without --ssg-beta turn SSG on with the default beta (said in one line on stderr)."""
    from .guidance import DEFAULT_BETA

    given = [f for f, v in (("--ssg-prior", args.ssg_prior), ("--ssg-interp", args.ssg_interp)) if v is not None]
    if given and args.ssg_beta is None:
        args.ssg_beta = DEFAULT_BETA
        print(f"note: {' and '.join(given)} without --ssg-beta: SSG on with the default beta {DEFAULT_BETA:g}", file=sys.stderr)
    args.ssg_prior = args.ssg_prior or "dse"
    args.ssg_interp = args.ssg_interp or "bilinear"


def _add_batch_args(p: argparse.ArgumentParser, *, labels: bool = True, batching: bool = True) -> None:
    """--classes/--per-class (``labels``), --seed, --batch-size (``batching``)."""
    if labels:
        p.add_argument("--classes", nargs="+", default=None,
                       help="class labels (integers; names such as 'sneaker bag' with the shipped model); default: all classes of the shipped model, else 0 1 2 3")
        p.add_argument("--per-class", type=int_arg(1), default=1, help="images per class (one grid row per class)")
    p.add_argument("--seed", type=int_arg(0), default=0, help="random seed, in [0, 2**63 - 1] (batch i uses seed + i)")
    if batching:
        p.add_argument("--batch-size", type=int_arg(1), default=16)


UPSTREAM_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}  # upstream VAR's FID protocol


def _fill_sampling_defaults(args: argparse.Namespace, defaults: dict) -> None:
    for name, value in defaults.items():
        if getattr(args, name, "absent") is None:
            setattr(args, name, value)


def check_model_args(args: argparse.Namespace) -> None:
    """--var and --vae come together; --config/--preset/--patch-nums only with them (never silently ignored)."""
    if bool(args.var) != bool(args.vae):
        raise UsageError("give both --var and --vae, or neither (the shipped Fashion-MNIST model)")
    if not args.var:
        for flag, value in (("--config", args.config), ("--preset", args.preset), ("--patch-nums", args.patch_nums)):
            if value is not None:
                raise UsageError(f"{flag} describes --var/--vae checkpoints; the shipped model has its own config: drop {flag} or give --var and --vae")


def load_from_args(args: argparse.Namespace, dtype: torch.dtype = torch.float32):
    """(vae, var) from --var/--vae (with --config/--preset/--patch-nums), or the shipped Fashion-MNIST model; the VAR in ``dtype``.

    Sampling flags left unset get the shipped model's card settings, or upstream's protocol for checkpoints."""
    from .config import infer_config
    from .loading import load_models, read_state_dict

    check_model_args(args)
    if not args.var:
        from .pretrained import SAMPLING_DEFAULTS, load_pretrained

        _fill_sampling_defaults(args, SAMPLING_DEFAULTS)
        return load_pretrained(device=args.device, dtype=dtype)
    _fill_sampling_defaults(args, UPSTREAM_SAMPLING)
    config = Path(args.config) if args.config else args.preset
    if config is None and args.patch_nums:
        var_state, vae_state = read_state_dict(args.var), read_state_dict(args.vae)
        config = infer_config(var_state, vae_state, args.patch_nums)
        return load_models(var_state, vae_state, config=config, device=args.device, dtype=dtype)
    return load_models(args.var, args.vae, config=config, device=args.device, dtype=dtype)


def _parse_classes(values: Optional[Sequence[str]], num_classes: int, named: bool) -> List[int]:
    """Integer labels, or Fashion-MNIST class names when ``named`` (the shipped model); default: every class."""
    if not values:
        return list(range(num_classes if named else min(4, num_classes)))
    if named:
        from .data import class_index

        try:
            return [class_index(v, num_classes) for v in values]
        except ValueError as e:
            raise UsageError(f"--classes: {e}") from None
    out = []
    for v in values:
        try:
            c = int(v)
        except ValueError:
            raise UsageError(f"--classes: {v!r} is not an integer label; class names work with the shipped model only") from None
        if not 0 <= c < num_classes:
            raise UsageError(f"--classes: class {c} is outside [0, {num_classes}); give labels of this model's classes")
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

    check_output_file(args.out, PNG, "--out")
    if args.out_dir is not None:
        check_output_dir(args.out_dir, "--out-dir")
    resolve_ssg_args(args)
    vae, var = load_from_args(args)
    labels = _labels(args, var)
    last_seed = args.seed + math.ceil(len(labels) / args.batch_size) - 1
    if last_seed > INT64_MAX:
        raise UsageError(f"--seed {args.seed}: the last batch's seed {last_seed} passes 2**63 - 1; give a smaller --seed")
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
    from .files import atomic_output

    check_output_file(args.out, PNG, "--out")
    if args.json is not None:
        check_output_file(args.json, (".json",), "--json")
    resolve_ssg_args(args)
    vae, var = load_from_args(args)
    labels = torch.tensor(_labels(args, var), device=var.lvl_1L.device)
    beta = args.ssg_beta if args.ssg_beta is not None else DEFAULT_BETA
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    runs = {
        "baseline": spectra_for(var, labels, args.seed, None, **sampling),
        f"SSG beta={beta:g}": spectra_for(var, labels, args.seed, ssg_from_args(args, beta), **sampling),
    }
    with atomic_output(args.out) as tmp:
        plot_spectra(runs, tmp, title=f"latent spectra, classes {labels.tolist()}")
    print(f"wrote {args.out}")
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps({k: [vars(s) for s in v] for k, v in runs.items()}, indent=1))
        print(f"wrote {args.json}")
    return 0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRACE_SUFFIXES = (".json", ".json.gz")


def cmd_bench(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .engine import Engine
    from .files import atomic_output
    from .loading import random_models
    from .sampler import sample_reference

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
    if args.random:
        _fill_sampling_defaults(args, UPSTREAM_SAMPLING)
        vae, var = random_models(ModelConfig.preset(args.random), args.device, dtype)
    else:
        vae, var = load_from_args(args)
    labels = torch.arange(args.batch_size, device=args.device) % var.num_classes
    ssg = ssg_from_args(args, args.ssg_beta)
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, ssg=ssg)
    if args.sampler == "engine":
        engine = Engine(var, vae, max_batch=args.batch_size, device=args.device, dtype=dtype, cuda_graphs=not args.no_graphs)

        def run():
            engine.generate(labels, seed=args.seed, **sampling)
    else:

        def run():
            sample_reference(var, args.batch_size, labels, g_seed=args.seed, **sampling)

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


# Fields each kind of checkpoint's shapes determine (``infer_config``); a VQ-VAE does not store its scales.
VAR_FIELDS = ("V", "Cvae", "patch_nums", "depth", "embed_dim", "num_heads", "num_classes", "attn_l2_norm", "shared_aln", "mlp_ratio")
VAE_FIELDS = ("V", "Cvae", "ch", "ch_mult", "num_res_blocks", "in_channels", "quant_conv_ks", "share_quant_resi")


def cmd_info(args: argparse.Namespace) -> int:
    """The checkpoint's config: from --config (checked against the shapes), else inferred; only fields that are known."""
    from .config import ModelConfig, infer_config, matching_presets
    from .loading import CheckpointError, _check_and_load, build_models, read_state_dict

    sd = read_state_dict(args.ckpt)
    kind = "VAR" if "pos_1LC" in sd else "VQ-VAE" if "quantize.embedding.weight" in sd else None
    if kind is None:
        raise UsageError(f"{args.ckpt} is neither a VAR nor a VQ-VAE state dict (no 'pos_1LC' / 'quantize.embedding.weight'); give a VAR or VQ-VAE checkpoint")
    if args.config:
        cfg = ModelConfig.from_json(args.config)
        vae, var = build_models(cfg, "meta")
        try:
            _check_and_load(var if kind == "VAR" else vae, sd, kind)
        except CheckpointError as e:
            raise UsageError(f"--config {args.config} does not describe {args.ckpt}: {e}") from None
    elif kind == "VAR":
        cfg = infer_config(sd, None, args.patch_nums)
    else:  # the shapes hold no scales: any placeholder lets infer_config read the rest
        cfg = infer_config(None, sd, args.patch_nums or (1,))
    fields = VAR_FIELDS if kind == "VAR" else VAE_FIELDS + (("patch_nums",) if args.config or args.patch_nums else ())
    n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    info = {
        "checkpoint": str(args.ckpt), "kind": kind, "config_source": args.config or "checkpoint shapes",
        "parameters_and_buffers": n_params, "config": {k: cfg.to_dict()[k] for k in fields},
    }
    if kind == "VAR":
        info["matching_presets"] = matching_presets(sd)
    print(json.dumps(info, indent=1))
    return 0


class CLIParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, ``error: <flag>: <problem>; <fix>``, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        if "; " not in message:
            message += f"; see {self.prog} --help"
        self.exit(2, f"error: {message}\n")


def run_cli(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status.

    A user error (``ValueError``, ``OSError``: bad values, files, checkpoints, configs) is one ``error: ...`` line and
    status 2 (``SSG_ENGINE_DEBUG=1`` shows its traceback instead); Ctrl-C is one ``interrupted`` line and status 130.
    Other exceptions are bugs and keep their traceback.
    """
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, or a bad command line (already reported in one line)
            return int(e.code or 0)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; lower --batch-size", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        if os.environ.get("SSG_ENGINE_DEBUG") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = CLIParser(prog="ssg-engine", description=__doc__, epilog="SSG_ENGINE_DEBUG=1 shows the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample class-conditional images into a PNG grid")
    add_model_args(p)
    add_sampling_args(p)
    _add_batch_args(p)
    p.add_argument("--compare", action="store_true", help="baseline and SSG side by side, same seeds, one PNG")
    p.add_argument("--out", default="grid.png", help="grid PNG path (missing folders are created)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image here (created if missing)")
    p.add_argument("--upscale", type=int_arg(1, UPSCALE_MAX), default=None,
                   help=f"nearest-neighbour upscaling of the grid PNG, 1..{UPSCALE_MAX} (default: to about 128 px per image)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("spectrum", help="per-scale spectra of the semantic residual and sampled tokens, baseline vs SSG (PNG)")
    add_model_args(p)
    add_sampling_args(p)
    _add_batch_args(p, batching=False)
    p.add_argument("--out", default="spectrum.png", help="plot PNG path (missing folders are created)")
    p.add_argument("--json", default=None, help="also write the numbers to this .json file")
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("bench", help="time sampling (optionally under torch.profiler)")
    add_model_args(p)
    add_sampling_args(p)
    _add_batch_args(p, labels=False)
    p.add_argument("--random", default=None, help="use random weights of a preset (d16 ... d36) instead of checkpoints")
    p.add_argument("--sampler", choices=["engine", "reference"], default="engine")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the VAR's dtype (the reference sampler: float32 only)")
    p.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    p.add_argument("--repeats", type=int_arg(1), default=3)
    p.add_argument("--profile", choices=["none", "torch"], default="none")
    p.add_argument("--trace", default=None, help="where --profile torch writes its Chrome trace (.json or .json.gz; default trace.json)")
    p.set_defaults(func=cmd_bench)

    from .eval import add_eval_subparsers
    from .training import add_train_subparser

    add_train_subparser(sub)
    add_eval_subparsers(sub)

    p = sub.add_parser("info", help="print a checkpoint's config (inferred from its shapes, or --config checked against them) and parameter count")
    p.add_argument("ckpt")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="model config JSON to check the checkpoint against and print, instead of inferring")
    g.add_argument("--patch-nums", type=patch_nums_arg, default=None, help="comma-separated scales, when the token count matches no preset")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ssg-engine``: see ``run_cli`` for how errors and Ctrl-C are reported."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
