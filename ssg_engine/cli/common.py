"""What every ``ssg-engine`` command shares: value checks, model / sampling / batch flags, and error reporting.

A bad value or flag combination raises ``UsageError`` (a ``ValueError``) whose message names the flag or file and
says how to fix it; ``run_cli`` prints it as one ``error: ...`` line with exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, NoReturn, Optional, Sequence, Tuple

import torch

from ..files import OutputError
from ..guidance import DEFAULT_BETA, DSE_INTERPS, PRIORS, SSG
from ..params import HART_UPSTREAM, INFINITY_UPSTREAM, SamplingParams
from ..pretrained import HART_SAMPLING, HART_SSG_BETA, INFINITY_SAMPLING, INFINITY_SSG_BETA, SAMPLING, load_pretrained


class UsageError(ValueError):
    """A bad command-line value or flag combination; the message names the flag or file and says how to fix it."""


INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# Bounds that keep the guided logits finite in float32: with |logit| ~ 1e2, CFG (<= (1 + 2|cfg|) x), SSG
# (<= (1 + 2|beta|) x) and temperature (<= 1e4 x) give at most ~4e12, far from float32's 3.4e38.
CFG_MAX = 1e3
SSG_BETA_MAX = 1e3
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-4, 1e4
SAMPLING_FLAGS = ("cfg", "top_k", "top_p", "temperature", "seed")  # SamplingParams fields that have a flag


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


# ----------------------------------------------------------------------------- model flags


FAMILIES = ("var", "infinity", "hart")


def add_model_args(p: argparse.ArgumentParser, infinity: bool = False) -> None:
    """--var/--vae (default: the shipped model), --config/--preset/--patch-nums (checkpoints only), --device; with
    ``infinity`` also --family (var | infinity) and --text-encoder."""
    if infinity:
        p.add_argument("--family", choices=FAMILIES, default="var",
                       help="var: class-conditional VAR (index tokens); infinity: text-to-image Infinity (bitwise tokens); "
                            "hart: text-to-image HART (hybrid tokens; --var: upstream's llm/ folder, --vae: its tokenizer/ folder); "
                            "without --var/--vae: the family's shipped Fashion-MNIST model")
    p.add_argument("--var", help="transformer checkpoint (.pth or .safetensors): a VAR, or with --family infinity an Infinity "
                                 "(infinity_*.pth); default: the shipped Fashion-MNIST model of the family")
    p.add_argument("--vae", help="its VAE checkpoint: VQ-VAE (VAR) or BSQ VAE (Infinity, e.g. infinity_vae_d32reg.pth)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="model config JSON for --var/--vae, whole or partial: the fields given are merged over what the "
                                    "checkpoints' shapes determine (default: all inferred)" + (
        "; Infinity: shapes cannot tell fused_norm (assumed true, with a warning line) nor num_scales (then --pn is "
        'required), e.g. {"fused_norm": false, "num_scales": 5}' if infinity else ""))
    g.add_argument("--preset", help="for --var/--vae: d16 | d20 | d24 | d30 | d36" + (
        "; Infinity: infinity_2b | infinity_layer12 .. infinity_layer48" if infinity else ""))
    g.add_argument("--patch-nums", type=patch_nums_arg, default=None,
                   help="comma-separated scales, for VAR --var/--vae whose token count matches no preset")
    if infinity:
        p.add_argument("--text-encoder", default=None,
                       help="Infinity --var/--vae: a local folder with google/flan-t5-xl's files (pip install 'ssg-engine[text]'), "
                            "or a folder written by `train --family infinity`; HART --var/--vae: a Qwen2 folder, or a folder written by "
                            "`train --family hart`; the shipped models have their own")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")


def model_family(args: argparse.Namespace) -> str:
    """The --family of a command that has the flag, else ``"var"``."""
    return getattr(args, "family", "var")


def check_model_args(args: argparse.Namespace) -> None:
    """--var and --vae come together; --config/--preset/--patch-nums/--text-encoder only with them, and only the
    family's (never silently ignored)."""
    for flag, value in (("--var", args.var), ("--vae", args.vae), ("--config", args.config), ("--preset", args.preset),
                        ("--text-encoder", getattr(args, "text_encoder", None))):
        if value is not None and not value.strip():  # never taken as "not given"
            raise UsageError(f"{flag} is empty; give a value, or leave the flag out")
    if bool(args.var) != bool(args.vae):
        raise UsageError("give both --var and --vae, or neither (the shipped Fashion-MNIST model)")
    text_encoder = getattr(args, "text_encoder", None)
    if model_family(args) == "var" and text_encoder is not None:
        raise UsageError("--text-encoder is for text-conditional models; add --family infinity, or drop it")
    if model_family(args) == "hart":
        for flag, value in (("--preset", args.preset), ("--patch-nums", args.patch_nums)):
            if value is not None:
                raise UsageError(f"{flag} is not for HART: its config is llm/config.json (or --config FILE.json); drop {flag}")
    if model_family(args) == "infinity" and args.patch_nums is not None:
        raise UsageError("--patch-nums describes VAR checkpoints; an Infinity schedule is --h-div-w and --pn")
    if not args.var:
        for flag, value in (("--config", args.config), ("--preset", args.preset), ("--patch-nums", args.patch_nums),
                            ("--text-encoder", text_encoder)):
            if value is not None:
                raise UsageError(f"{flag} describes --var/--vae checkpoints; the shipped model has its own config: drop {flag} or give --var and --vae")
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file; give the model's config JSON (a `train` folder's config.json)")
    if text_encoder is not None and not Path(text_encoder).is_dir():
        files = ("Qwen2's files (HART's text encoder)" if model_family(args) == "hart" else
                 "google/flan-t5-xl's files, or a folder written by `train --family infinity`")
        raise UsageError(f"--text-encoder {text_encoder}: text encoder folder not found; give a local folder with {files}")


def load_from_args(args: argparse.Namespace, dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """(vae, var) from --var/--vae (with --config/--preset/--patch-nums), or the shipped Fashion-MNIST model; on
    ``device`` (default: --device), the VAR in ``dtype``."""
    from ..families.var.config import infer_config
    from ..loading import expect_family, load_models, read_state_dict

    check_model_args(args)
    device = device or args.device
    if not args.var:
        return load_pretrained(device=device, dtype=dtype)
    config = Path(args.config) if args.config else args.preset
    if config is None and args.patch_nums:
        var_state, vae_state = read_state_dict(args.var), read_state_dict(args.vae)
        expect_family(var_state, "var", args.var)
        config = infer_config(var_state, vae_state, args.patch_nums)
        return load_models(var_state, vae_state, config=config, device=device, dtype=dtype)
    return load_models(args.var, args.vae, config=config, device=device, dtype=dtype)


def load_infinity_from_args(args: argparse.Namespace, device: Optional[str] = None):
    """(model, vae, text encoder or None) from --var/--vae (with --config/--preset) and --text-encoder, or the shipped
    Fashion-MNIST text-to-image model (with its own text encoder); float32 on ``device`` (default: --device)."""
    import warnings

    from ..families.var.config import AssumedSettingWarning, read_config_file
    from ..loading import CheckpointError, load_infinity
    from ..pretrained import load_pretrained_infinity

    check_model_args(args)
    device = device or args.device
    if not args.var:
        return load_pretrained_infinity(device=device)
    config = args.preset
    if args.config is not None:
        config = read_config_file(args.config)
        if isinstance(config.get("infinity"), dict):  # a `train --family infinity` folder's
            config = config["infinity"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AssumedSettingWarning)
        try:
            model, vae = load_infinity(args.var, args.vae, config=config, device=device)
        except (TypeError, ValueError) as e:
            if args.config is None or isinstance(e, CheckpointError):
                raise
            raise UsageError(f"--config {args.config}: {e}; fix the file (a partial file gives only what the checkpoint's shapes cannot tell)") from None
    args.assumed_settings = [str(w.message) for w in caught if issubclass(w.category, AssumedSettingWarning)]
    for w in caught:  # other warnings as Python shows them
        if not issubclass(w.category, AssumedSettingWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return model, vae, text_encoder_from_args(args, device)


def load_hart_from_args(args: argparse.Namespace, device: Optional[str] = None):
    """(model, tokenizer, text encoder or None) from --var (upstream's llm/ folder or file), --vae (tokenizer/),
    --config (the llm's config.json instead of the folder's) and --text-encoder (a Qwen2 folder, or a folder written
    by ``train --family hart``: its small encoder), on --device; without --var the shipped Fashion-MNIST HART model
    (with its own text encoder)."""
    from ..loading import load_hart
    from ..pretrained import load_pretrained_hart

    check_model_args(args)
    device = device or args.device
    if not args.var:
        return load_pretrained_hart(device=device)
    model, tokenizer = load_hart(args.var, args.vae, config=args.config, device=device)
    encoder = None
    if args.text_encoder is not None and (Path(args.text_encoder) / "text_encoder.safetensors").is_file():
        from ..families.hart.text import WordTextEncoder
        from ..pretrained import folder_text_encoder

        try:
            encoder = WordTextEncoder(folder_text_encoder(args.text_encoder, device), model.context_token)
        except (ValueError, OSError) as e:
            raise UsageError(f"--text-encoder: {e}") from None
    elif args.text_encoder is not None:
        from ..families.hart.text import Qwen2TextEncoder

        with contextlib.suppress(ImportError):  # transformers' "Loading weights" bar: a bad command line stays one line
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        try:
            encoder = Qwen2TextEncoder(args.text_encoder, device=device, max_length=model.context_token)  # upstream: equal
        except (ImportError, ValueError, OSError) as e:
            raise UsageError(f"--text-encoder: {e}") from None
    return model, tokenizer, encoder


def report_assumed_settings(args: argparse.Namespace) -> None:
    """One ``warning: ...`` line per setting ``load_infinity_from_args`` found assumed (it names the setting and how
    to set it); called once every flag has been checked, so that a bad command line stays one ``error:`` line."""
    for message in getattr(args, "assumed_settings", ()):
        print(f"warning: {message}", file=sys.stderr)


def text_encoder_from_args(args: argparse.Namespace, device: str):
    """--text-encoder FOLDER: a folder written by ``train --family infinity`` (its small text encoder), else a Flan-T5
    folder (``ssg_engine.text``); None without the flag."""
    if args.text_encoder is None:
        return None
    from ..pretrained import text_encoder_from_folder

    try:
        return text_encoder_from_folder(args.text_encoder, device)
    except (ImportError, ValueError, OSError) as e:
        raise UsageError(f"--text-encoder: {e}") from None


def model_ssg_beta(args: argparse.Namespace) -> float:
    """The SSG beta used when SSG is asked for without --ssg-beta: the shipped Infinity or HART model's card value
    (``pretrained.INFINITY_SSG_BETA``, ``HART_SSG_BETA``), else the default ``guidance.DEFAULT_BETA``."""
    if args.var:
        return DEFAULT_BETA
    return {"infinity": INFINITY_SSG_BETA, "hart": HART_SSG_BETA}.get(model_family(args), DEFAULT_BETA)


def model_sampling(args: argparse.Namespace) -> SamplingParams:
    """The sampling settings of the model the flags name: the shipped model's card (``pretrained.SAMPLING``, or
    ``INFINITY_SAMPLING`` with --family infinity, ``HART_SAMPLING`` with --family hart), or upstream's protocol
    (``SamplingParams()``; Infinity: ``params.INFINITY_UPSTREAM``; HART: ``params.HART_UPSTREAM``) for --var/--vae
    checkpoints."""
    if model_family(args) == "hart":
        return HART_UPSTREAM if args.var else HART_SAMPLING
    if model_family(args) == "infinity":
        return INFINITY_UPSTREAM if args.var else INFINITY_SAMPLING
    return SamplingParams() if args.var else SAMPLING


# ----------------------------------------------------------------------------- sampling flags


def model_default_help(name: str) -> str:
    """Help text for a flag left unset: the value of SamplingParams field ``name`` for the shipped model and upstream."""
    shipped, upstream = getattr(SAMPLING, name), getattr(SamplingParams(), name)
    if shipped == upstream:
        return f"default: {upstream:g}"
    return f"default: the model card's value (shipped model: {shipped:g}) or upstream's {upstream:g}"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--cfg/--top-k/--top-p/--temperature (unset: the model's ``SamplingParams``) and --ssg-*."""
    p.add_argument("--cfg", type=float_arg(-CFG_MAX, CFG_MAX), default=None,
                   help=f"CFG scale, |cfg| <= {CFG_MAX:g} (Infinity: the CFG weight w of every scale, 1 = off, and --temperature "
                        f"is its tau); {model_default_help('cfg')}")
    p.add_argument("--top-k", type=int_arg(0, INT32_MAX), default=None, help=f"0 disables it; {model_default_help('top_k')}")
    p.add_argument("--top-p", type=float_arg(0.0, 1.0), default=None, help=f"in [0, 1], 0 disables it; {model_default_help('top_p')}")
    p.add_argument("--temperature", type=float_arg(TEMPERATURE_MIN, TEMPERATURE_MAX), default=None,
                   help=f"in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}]; {model_default_help('temperature')}")
    p.add_argument("--ssg-beta", type=float_arg(-SSG_BETA_MAX, SSG_BETA_MAX), default=None,
                   help=f"SSG strength, |beta| <= {SSG_BETA_MAX:g} (off when not given; --compare, --ssg-prior and --ssg-interp use "
                        f"{DEFAULT_BETA:g}, or the model card's: {INFINITY_SSG_BETA:g} for the shipped Infinity model, "
                        f"{HART_SSG_BETA:g} for the shipped HART model)")
    p.add_argument("--ssg-prior", choices=PRIORS, default=None, help="SSG prior (default dse); turns SSG on")
    p.add_argument("--ssg-interp", choices=DSE_INTERPS, default=None, help="DSE interpolation (default bilinear); turns SSG on")


def resolve_ssg_args(args: argparse.Namespace) -> None:
    """--ssg-prior/--ssg-interp without --ssg-beta turn SSG on with the default beta (said in one line on stderr)."""
    given = [f for f, v in (("--ssg-prior", args.ssg_prior), ("--ssg-interp", args.ssg_interp)) if v is not None]
    if given and args.ssg_beta is None:
        args.ssg_beta = model_ssg_beta(args)
        print(f"note: {' and '.join(given)} without --ssg-beta: SSG on with the default beta {args.ssg_beta:g}", file=sys.stderr)
    args.ssg_prior = args.ssg_prior or "dse"
    args.ssg_interp = args.ssg_interp or "bilinear"


def ssg_from_args(args: argparse.Namespace, beta: Optional[float]) -> Optional[SSG]:
    """SSG at ``beta`` with --ssg-prior/--ssg-interp (after ``resolve_ssg_args``); None (off) when ``beta`` is None."""
    return None if beta is None else SSG(beta=beta, prior=args.ssg_prior, interp=args.ssg_interp)


def sampling_from_args(args: argparse.Namespace, defaults: SamplingParams, ssg_beta: Optional[float]) -> SamplingParams:
    """The flags given among --cfg/--top-k/--top-p/--temperature/--seed, ``defaults`` (the model's) for those left
    unset, and SSG at ``ssg_beta`` (None: off)."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    return defaults.replace(**given, ssg=ssg_from_args(args, ssg_beta))


# ----------------------------------------------------------------------------- labels and batches


def add_batch_args(p: argparse.ArgumentParser, *, labels: bool = True, batching: bool = True) -> None:
    """--classes/--per-class (``labels``), --seed, --batch-size (``batching``)."""
    if labels:
        p.add_argument("--classes", nargs="+", default=None,
                       help="class labels (integers; names such as 'sneaker bag' with the shipped model); default: all classes of the shipped model, else 0 1 2 3")
        p.add_argument("--per-class", type=int_arg(1), default=1, help="images per class (one grid row per class)")
    p.add_argument("--seed", type=int_arg(0), default=None,
                   help=f"random seed, in [0, 2**63 - 1] (sample: image j draws from its own stream keyed by (seed, j), whatever "
                        f"--batch-size); {model_default_help('seed')}")
    if batching:
        p.add_argument("--batch-size", type=int_arg(1), default=16)


def parse_classes(values: Optional[Sequence[str]], num_classes: int, named: bool) -> List[int]:
    """Integer labels, or Fashion-MNIST class names when ``named`` (the shipped model); default: every class."""
    if not values:
        return list(range(num_classes if named else min(4, num_classes)))
    if named:
        from ..data import class_index

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


def labels_from_args(args: argparse.Namespace, num_classes: int) -> List[int]:
    """--classes (names with the shipped model), each repeated --per-class times."""
    classes = parse_classes(args.classes, num_classes, named=not args.var)
    return [c for c in classes for _ in range(args.per_class)]


# ----------------------------------------------------------------------------- parsing and error reporting


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
    Other exceptions are bugs and keep their traceback. An ``OutputError`` (a full disk) is prefixed with the flag
    that names the file (``output_flag``).
    """
    args: Optional[argparse.Namespace] = None
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
        flag = output_flag(args, e.path) if isinstance(e, OutputError) and args is not None else None
        print(f"error: {flag}: {message}" if flag else f"error: {message}", file=sys.stderr)
        return 2


def output_flag(args: argparse.Namespace, path: Path) -> Optional[str]:
    """The flag of ``args`` that names the output ``path``: the one whose value is ``path`` or, failing that, the
    innermost folder holding it (``--out-dir`` for ``OUT_DIR/00003.png``); None when no flag names it."""
    target = path.absolute()
    best: Optional[Tuple[int, str]] = None
    for dest, value in vars(args).items():
        if not isinstance(value, (str, Path)) or not str(value):
            continue
        given = Path(value).absolute()
        if given == target or given in target.parents:
            rank = len(given.parts)
            if best is None or rank > best[0]:
                best = (rank, "--" + dest.replace("_", "-"))
    return best[1] if best else None
