"""``ssg-engine sample`` (a PNG grid, optionally baseline and SSG side by side) and ``ssg-engine spectrum``."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..files import OutputError
from ..params import SamplingParams
from .common import (
    UsageError, add_batch_args, add_model_args, add_sampling_args, check_model_args, check_output_dir, check_output_file,
    float_arg, int_arg, labels_from_args, load_from_args, load_hart_from_args, load_infinity_from_args, model_family, model_sampling, model_ssg_beta,
    parse_classes, report_assumed_settings, resolve_ssg_args, sampling_from_args,
)

UPSCALE_MAX = 64  # a 32 px image upscaled 64x is 2048 px; more only makes huge PNGs
PNG = (".png",)


Conditions = Union[List[int], Any]  # class labels, or TextFeatures of one prompt per image


def sample_batches(model, vae, conditions: Conditions, n: int, params: SamplingParams, batch_size: int, desc: str,
                   **family: Any) -> torch.Tensor:
    """Images for the ``n`` ``conditions`` (labels, or text features sliced by prompt) in batches of ``batch_size``;
    image ``j`` draws from its own stream keyed by ``(params.seed, j)`` (``ssg_engine.seeding.row_seeds``), so the batch
    size changes no image; ``family``: Infinity keywords of ``generate`` (schedule, negative)."""
    from tqdm import tqdm

    from ..api import generate
    from ..seeding import row_seeds

    starts = range(0, n, batch_size)
    images = []
    with tqdm(starts, desc=desc, unit="batch", file=sys.stderr) as bar:  # closed (its last line drawn) before an error is reported
        for start in bar:
            stop = min(start + batch_size, n)
            extra = {k: (v[start:stop] if k == "negative" else v) for k, v in family.items()}
            images.append(generate(model, vae, conditions[start:stop], params, row_seeds=row_seeds(params.seed, stop - start, start), **extra))
    return torch.cat(images)


def parse_pn(text: Optional[str]) -> Union[None, int, str]:
    """--pn as a number of scales or one of Infinity's total-pixel names."""
    if text is None:
        return None
    if not text.strip():
        raise UsageError("--pn is empty; give a number of scales or one of 0.06M | 0.25M | 0.60M | 1M, or leave it out")
    return int(text) if text.isascii() and text.isdigit() else text  # not "²": str.isdigit takes it, int() does not


def read_text_features(path: str, Ct5: int):
    """--text-features FILE.pt: ``{"kv_compact": (N, Ct5), "lens": (B,)}``, ``{"features": (B, T, Ct5), "mask": (B, T)}``
    or upstream's ``(kv_compact, lens, cu_seqlens_k, max_seqlen_k)``, as TextFeatures of width ``Ct5``."""
    from ..families.infinity.model import TextFeatures

    file = Path(path)  # its existence: check_family_flags
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is a user error here
        raise UsageError(f"--text-features {path}: not a torch.save file ({type(e).__name__}); save the features with torch.save") from None
    try:
        if isinstance(obj, dict) and {"kv_compact", "lens"} <= set(obj):
            obj = TextFeatures(obj["kv_compact"], obj["lens"])
        elif isinstance(obj, dict) and {"features", "mask"} <= set(obj):
            obj = (obj["features"], obj["mask"])
        text = TextFeatures.coerce(obj)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--text-features {path}: {e}; save {{'kv_compact': (N, C), 'lens': [..]}} or {{'features': (B, T, C), 'mask': (B, T)}}") from None
    if text.kv_compact.shape[1] != Ct5:
        raise UsageError(f"--text-features {path}: features have width {text.kv_compact.shape[1]}, this model takes {Ct5} (its text encoder's); "
                         "encode the prompts with the model's text encoder")
    return TextFeatures(text.kv_compact.float(), text.lens)


def check_family_flags(args: argparse.Namespace) -> None:
    """Each family's conditioning flags only with that family (never silently ignored)."""
    infinity_flags = {"--prompt": args.prompt, "--text-features": args.text_features, "--negative-prompt": args.negative_prompt,
                      "--h-div-w": args.h_div_w, "--pn": args.pn, "--per-prompt": args.per_prompt}
    if model_family(args) == "var":
        given = [f for f, v in infinity_flags.items() if v is not None]
        if given:
            raise UsageError(f"{given[0]} is for text-to-image models; add --family infinity")
        return
    if args.classes is not None or args.per_class != 1:
        raise UsageError(f"--classes/--per-class are for class-conditional models; with --family {model_family(args)} give --prompt (and --per-prompt)")
    if model_family(args) == "hart":
        given = [f for f in ("--negative-prompt", "--h-div-w", "--pn") if infinity_flags[f] is not None]
        if given:
            raise UsageError(f"{given[0]} is for --family infinity; HART's size and scales are its config's, and its CFG "
                             "uses the model's empty text")
    if args.prompt is not None and args.text_features is not None:
        raise UsageError("give --prompt or --text-features, not both")
    if args.text_features is not None and args.negative_prompt is not None:
        raise UsageError("--negative-prompt needs a text encoder to encode it; with --text-features leave it out")
    if args.text_features is not None and not args.text_features.strip():
        raise UsageError("--text-features is empty; give a .pt file saved with torch.save")
    if args.var and args.text_encoder is None and args.text_features is None:
        encoder = "Qwen2" if model_family(args) == "hart" else "Flan-T5"
        raise UsageError(f"--family {model_family(args)} with --var/--vae needs --text-encoder FOLDER ({encoder}) or --text-features FILE.pt")
    if args.text_features is not None and not Path(args.text_features).is_file():
        raise UsageError(f"--text-features {args.text_features}: no such file; give a .pt file saved with torch.save")
    if model_family(args) == "infinity":
        check_schedule_flags(args)


def check_schedule_flags(args: argparse.Namespace) -> None:
    """--h-div-w in Infinity's ratio table and --pn a number of scales or a table name (checked before any model
    loads; the schedule itself, which may take the model's number of scales, is made later)."""
    from ..families.infinity.model import scale_schedule

    h_div_w = 1.0 if args.h_div_w is None else args.h_div_w
    try:
        scale_schedule(h_div_w, 1)
    except ValueError as e:
        raise UsageError(f"--h-div-w {args.h_div_w}: {e}") from None
    if args.pn is not None:
        try:
            scale_schedule(h_div_w, parse_pn(args.pn))
        except ValueError as e:
            raise UsageError(f"--pn {args.pn}: {e}") from None


def image_pixels(model, vae, schedule: Optional[Sequence[Tuple[int, int]]] = None) -> int:
    """Pixels of one sampled image: the last scale's tokens (``schedule``'s for Infinity) times the VAE's upsampling
    (VQ-VAE ``downsample``, BSQ VAE ``patch_size``) squared."""
    h, w = schedule[-1] if schedule else (model.patch_nums[-1],) * 2
    factor = vae.downsample if hasattr(vae, "downsample") else vae.config.patch_size
    return h * w * factor**2


def check_image_count(args: argparse.Namespace, count: int, pixels: int) -> None:
    """``count`` images of ``pixels`` pixels (twice with --compare), kept as float32 with their grid, fit in this
    machine's memory; ``UsageError`` naming --per-prompt / --per-class otherwise (before any sampling)."""
    from ..validation import check_memory

    flag, per = ("--per-prompt", args.per_prompt or 1) if model_family(args) != "var" else ("--per-class", args.per_class)
    images = count * (2 if getattr(args, "compare", False) else 1)
    try:
        check_memory(images * 2 * 3 * 4 * pixels, f"{flag} {per}",
                     f"that is {images} images of {pixels} pixels (kept as float32, with their grid); lower {flag}")
    except ValueError as e:
        raise UsageError(str(e)) from None


def infinity_conditions(args: argparse.Namespace, model, vae, text_encoder) -> Tuple[Any, int, Dict[str, Any], List[str]]:
    """(text features of every image, image count, Infinity keywords, one label per prompt) from --prompt/--text-features,
    --per-prompt, --negative-prompt, --h-div-w and --pn; everything is checked (and every prompt encoded) before sampling."""
    from ..data import CLASS_PHRASES, TRAIN_TEMPLATES, make_prompt
    from ..families.infinity.model import TextFeatures, scale_schedule

    per = args.per_prompt or 1
    features = read_text_features(args.text_features, model.Ct5) if args.text_features is not None else None
    pn = parse_pn(args.pn)
    scales = model.config.num_scales if pn is None else pn
    try:  # (with the scales unknown, one scale checks --h-div-w first)
        schedule = scale_schedule(1.0 if args.h_div_w is None else args.h_div_w, 1 if scales is None else scales)
    except ValueError as e:
        raise UsageError(f"--h-div-w/--pn: {e}") from None
    if scales is None:
        raise UsageError(f"--pn is required for {args.var}: its number of scales is unknown (a checkpoint's shapes cannot tell it); "
                         "give --pn N (the scales it was trained on) or 0.06M | 0.25M | 0.60M | 1M, or num_scales in a --config file")
    family: Dict[str, Any] = {"schedule": schedule}
    pixels = image_pixels(model, vae, schedule)
    if features is not None:
        check_image_count(args, features.batch * per, pixels)
        rows = [features[i : i + 1] for i in range(features.batch) for _ in range(per)]
        text = TextFeatures(torch.cat([p.kv_compact for p in rows]), [n for p in rows for n in p.lens])
        prompts = [f"features {i}" for i in range(features.batch)]
    else:  # a text encoder: check_family_flags asked for one
        prompts = args.prompt or [make_prompt(c, TRAIN_TEMPLATES[0]) for c in range(len(CLASS_PHRASES))]
        check_image_count(args, len(prompts) * per, pixels)
        try:
            text = text_encoder.encode([p for p in prompts for _ in range(per)])
        except (TypeError, ValueError) as e:
            raise UsageError(f"--prompt: {e}") from None
        check_encoder_width(text, model.Ct5)
    if args.negative_prompt is not None:
        try:
            family["negative"] = text_encoder.encode([args.negative_prompt] * text.batch)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--negative-prompt: {e}") from None
    return text, text.batch, family, prompts


def hart_conditions(args: argparse.Namespace, model, tokenizer, text_encoder) -> Tuple[Any, int, List[str]]:
    """(HART text features of every image, image count, one label per prompt) from --text-features
    (``HARTTextFeatures.save``'s file) or --prompt with --text-encoder (or the shipped model's), and --per-prompt; checked (and every prompt
    encoded) before sampling; the shipped model without --prompt: one prompt per Fashion-MNIST class."""
    from ..data import CLASS_PHRASES, TRAIN_TEMPLATES, make_prompt

    per = args.per_prompt or 1
    if args.text_features is not None:
        from ..families.hart.text import HARTTextFeatures

        try:
            features = HARTTextFeatures.load(args.text_features)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--text-features: {e}") from None
        check_image_count(args, features.batch * per, image_pixels(model, tokenizer))
        text = features[torch.arange(features.batch).repeat_interleave(per)]
        labels = [f"features {i}" for i in range(features.batch)]
    else:  # a text encoder: check_family_flags asked for one
        if not args.prompt and args.var:
            raise UsageError("--family hart needs --prompt TEXT (repeat it for more) with --text-encoder, or --text-features FILE.pt")
        labels = args.prompt or [make_prompt(c, TRAIN_TEMPLATES[0]) for c in range(len(CLASS_PHRASES))]  # the shipped model's
        check_image_count(args, len(labels) * per, image_pixels(model, tokenizer))
        try:
            text = text_encoder.encode([p for p in labels for _ in range(per)])
        except (TypeError, ValueError) as e:
            raise UsageError(f"--prompt: {e}") from None
    Lc, Cc = model.context_token, model.context_embed.weight.shape[1]
    if tuple(text.context.shape[1:]) != (Lc, Cc):
        source = "--text-features" if args.text_features is not None else "--text-encoder"
        raise UsageError(f"{source} gives features of shape (B, {text.context.shape[1]}, {text.context.shape[2]}); this HART takes "
                         f"(B, {Lc}, {Cc}) (context_token, context_dim); give the text encoder the model was trained with")
    return text, text.batch, labels


def check_encoder_width(text: Any, Ct5: int) -> None:
    """The --text-encoder's features (``text``) have the model's width ``Ct5``; ``UsageError`` otherwise."""
    if text.kv_compact.shape[1] != Ct5:
        raise UsageError(f"--text-encoder gives features of width {text.kv_compact.shape[1]}, this model takes {Ct5} (its "
                         "text_channels); give the text encoder the model was trained with")


def class_labels_text(classes: Sequence[int], named: bool) -> List[str]:
    """Row labels of class-conditional grids: the Fashion-MNIST class names (``named``: the shipped model), else
    ``"class N"``."""
    from ..data import FASHION_MNIST_CLASSES

    return [FASHION_MNIST_CLASSES[c] if named else f"class {c}" for c in classes]


def cmd_sample(args: argparse.Namespace) -> int:
    from ..imaging import labelled_grid, make_grid, save_image, save_png

    check_output_file(args.out, PNG, "--out")
    if args.out_dir is not None:
        check_output_dir(args.out_dir, "--out-dir")
    check_model_args(args)
    check_family_flags(args)
    resolve_ssg_args(args)
    beta = model_ssg_beta(args) if args.compare and args.ssg_beta is None else args.ssg_beta
    params = sampling_from_args(args, model_sampling(args), beta)
    if model_family(args) == "infinity":
        model, vae, text_encoder = load_infinity_from_args(args)
        conditions, n, family, row_labels = infinity_conditions(args, model, vae, text_encoder)
        if "negative" not in family and params.cfg != 1 and max(conditions.lens) > model.config.text_maxlen:
            raise UsageError(f"{'--text-features' if args.text_features else '--prompt'}: a prompt has {max(conditions.lens)} "
                             f"tokens, more than the {model.config.text_maxlen} (text_maxlen) that the model's unconditional text "
                             "covers for CFG; shorten it" + ("" if args.text_features else ", or give --negative-prompt"))
        per = args.per_prompt or 1
    elif model_family(args) == "hart":
        model, vae, text_encoder = load_hart_from_args(args)
        conditions, n, row_labels = hart_conditions(args, model, vae, text_encoder)
        family = {}
        per = args.per_prompt or 1
    else:
        vae, model = load_from_args(args)
        check_image_count(args, len(parse_classes(args.classes, model.num_classes, named=not args.var)) * args.per_class,
                          image_pixels(model, vae))
        conditions = labels_from_args(args, model.num_classes)
        n, family = len(conditions), {}
        per = args.per_class
        row_labels = class_labels_text(parse_classes(args.classes, model.num_classes, named=not args.var), named=not args.var)
    report_assumed_settings(args)
    t0 = time.perf_counter()
    if args.compare:
        base = sample_batches(model, vae, conditions, n, params.replace(ssg=None), args.batch_size, "baseline", **family)
        guided = sample_batches(model, vae, conditions, n, params, args.batch_size, params.ssg.title(), **family)
        images = torch.cat([base, guided])
    else:
        images = sample_batches(model, vae, conditions, n, params, args.batch_size, "sampling", **family)
    dt = time.perf_counter() - t0
    upscale = args.upscale or max(1, 128 // images.shape[-1])
    written: List[Path] = []
    try:  # a write that fails (a full disk) takes back this run's other files: all of them or none
        if args.out_dir:
            for i, img in enumerate(images):
                written.append(save_png(img, Path(args.out_dir) / f"{i:05d}.png"))
        if args.compare:  # one row per class / prompt, a header over each half
            save_image(labelled_grid([base, guided], ["baseline", params.ssg.title()], row_labels, per, upscale), args.out)
        else:
            save_png(make_grid(images, per if per > 1 else None), args.out, upscale=upscale)
    except OutputError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    print(f"wrote {args.out} ({images.shape[0]} images of {images.shape[-1]}x{images.shape[-2]}, {dt:.2f}s)")
    if args.out_dir:
        print(f"wrote {images.shape[0]} PNGs to {args.out_dir}")
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    from ..analysis import plot_spectra, spectra_for
    from ..files import atomic_output

    check_output_file(args.out, PNG, "--out")
    if args.json is not None:
        check_output_file(args.json, (".json",), "--json")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("spectrum draws its --out plot with matplotlib, which is not installed: pip install 'ssg-engine[plot]' "
                         "(or pip install matplotlib)")
    resolve_ssg_args(args)
    beta = args.ssg_beta if args.ssg_beta is not None else model_ssg_beta(args)
    guided = sampling_from_args(args, model_sampling(args), beta)
    vae, var = load_from_args(args)
    check_image_count(args, len(parse_classes(args.classes, var.num_classes, named=not args.var)) * args.per_class,
                      image_pixels(var, vae))
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
    p = sub.add_parser("sample", help="sample class-conditional (VAR) or text-conditional (--family infinity | hart) images into a PNG grid")
    add_model_args(p, infinity=True)
    add_sampling_args(p)
    add_batch_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="--family infinity | hart: a prompt (repeat the flag for more; default: one per Fashion-MNIST class with the "
                        "shipped model)")
    p.add_argument("--per-prompt", type=int_arg(1), default=None, help="--family infinity | hart: images per prompt (one grid row per prompt)")
    p.add_argument("--text-features", default=None,
                   help="--family infinity: precomputed text features (.pt: {'kv_compact': (N, C), 'lens': [..]} or "
                        "{'features': (B, T, C), 'mask': (B, T)}) instead of --prompt; --family hart: a file written by "
                        "HARTTextFeatures.save")
    p.add_argument("--negative-prompt", default=None, help="--family infinity: negative prompt for CFG (default: the learned empty text)")
    p.add_argument("--h-div-w", type=float_arg(0.1, 10.0), default=None,
                   help="--family infinity: height / width, one of Infinity's ratios (default 1.0)")
    p.add_argument("--pn", default=None,
                   help="--family infinity: number of scales or 0.06M | 0.25M | 0.60M | 1M (default: the model's num_scales; "
                        "required for a checkpoint whose --config does not give it)")
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
