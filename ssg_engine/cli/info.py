"""``ssg-engine info``: a checkpoint's family (VAR, VQ-VAE, Infinity, BSQ VAE, HART and its tokenizer) and config (inferred from its shapes, or
for VAR / VQ-VAE --config checked against them)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Dict

from .common import UsageError, patch_nums_arg

# Fields each kind of checkpoint's shapes determine (``infer_config``); a VQ-VAE does not store its scales.
VAR_FIELDS = ("V", "Cvae", "patch_nums", "depth", "embed_dim", "num_heads", "num_classes", "attn_l2_norm", "shared_aln", "mlp_ratio")
VAE_FIELDS = ("V", "Cvae", "ch", "ch_mult", "num_res_blocks", "in_channels", "quant_conv_ks", "share_quant_resi")


def _infinity_info(args: argparse.Namespace, sd: Dict[str, Any], family: str) -> Dict[str, Any]:
    """Config fields (and matching presets) of an Infinity or BSQ VAE state dict: all from the shapes."""
    from ..families.infinity.tokenizer import load_bsq_vae
    import torch

    from ..families.infinity.model import INFINITY_SHAPE_FIELDS, InfinityConfig, InfinityTransformer
    from ..loading import STALE_INFINITY_BUFFERS

    for flag, value in (("--config", args.config), ("--patch-nums", args.patch_nums)):
        if value:
            raise UsageError(f"{flag}: only for VAR / VQ-VAE checkpoints, and {args.ckpt} is {'an Infinity' if family == 'infinity' else 'a BSQ VAE'} "
                             f"checkpoint (its config comes from its shapes); drop {flag}")
    if family == "bsq_vae":  # every key and shape checked, as loading would (on meta: no memory)
        return {"config": dataclasses.asdict(load_bsq_vae(dict(sd), device="meta").config)}
    cfg = InfinityConfig.from_state_dict(sd)
    with torch.device("meta"):  # every key checked, as loading would (no memory; loading checks the shapes too)
        InfinityTransformer(cfg).check_upstream({k: v for k, v in sd.items() if k not in STALE_INFINITY_BUFFERS}, check_shapes=False)
    return {"config": {k: getattr(cfg, k) for k in INFINITY_SHAPE_FIELDS}, "matching_presets": cfg.matching_presets()}


def _hart_info(args: argparse.Namespace, sd: Dict[str, Any], family: str, folder: Any) -> Dict[str, Any]:
    """Config of a HART transformer or tokenizer: its folder's config.json (upstream's released layout), checked
    against the weights as loading would (on meta: no memory)."""
    import torch

    from ..families.hart.config import HARTConfig, HARTTokenizerConfig
    from ..checkpoints import _check_and_load
    from ..families.hart.loading import _read_config, tokenizer_state_dict
    from ..families.hart.model import HARTTransformer
    from ..families.hart.tokenizer import HARTTokenizer

    for flag, value in (("--config", args.config), ("--patch-nums", args.patch_nums)):
        if value:
            raise UsageError(f"{flag}: not for HART checkpoints (their config is the folder's config.json); drop {flag}")
    what = "HART transformer" if family == "hart" else "HART tokenizer"
    raw = _read_config(folder, what, "config")
    with torch.device("meta"):  # keys and shapes checked against the config, as loading would (no memory)
        if family == "hart":
            cfg = HARTConfig.from_dict(raw)
            shapes = {k: tuple(sd[k].shape) for k in ("word_embed.weight", "head.weight") if k in sd}
            module = HARTTransformer(cfg, Cvae=shapes.get("word_embed.weight", (0, 32))[1], V=shapes.get("head.weight", (4096,))[0])
            state = {k: v for k, v in sd.items() if k not in ("lvl_1L", "attn_bias_for_masking")}
        else:
            cfg = HARTTokenizerConfig.from_dict(raw)
            module = HARTTokenizer(cfg, cfg.v_patch_nums)
            state = tokenizer_state_dict(sd, module)
    _check_and_load(module, state, f"{what} {args.ckpt}")
    return {"config_source": str(folder / "config.json"), "config": dataclasses.asdict(cfg)}


def cmd_info(args: argparse.Namespace) -> int:
    """The checkpoint's family and config: from --config (checked against the shapes), else inferred; only fields that
    are known."""
    from ..checkpoints import _check_and_load
    from ..families.var.config import ModelConfig, infer_config, matching_presets
    from ..loading import FAMILY_KEYS, FAMILY_NAMES, CheckpointError, build_models, checkpoint_family, read_state_dict

    from pathlib import Path

    from ..families.hart.loading import weights_in

    path = Path(args.ckpt)
    sd = read_state_dict(weights_in(path, prefer_ema=True) if path.is_dir() else path)  # a folder: HART's llm/ or tokenizer/
    family = checkpoint_family(sd)
    if family is None:
        raise UsageError(f"{args.ckpt} is not a VAR, VQ-VAE, Infinity, BSQ VAE, HART or HART tokenizer state dict (it must hold exactly one of the keys "
                         f"{', '.join(repr(k) for k in FAMILY_KEYS.values())}); give one of those checkpoints")
    kind = FAMILY_NAMES[family]
    n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    info: Dict[str, Any] = {"checkpoint": str(args.ckpt), "kind": kind, "config_source": "checkpoint shapes", "parameters_and_buffers": n_params}
    if family in ("infinity", "bsq_vae"):
        try:
            details = _infinity_info(args, sd, family)
        except UsageError:
            raise
        except ValueError as e:  # a damaged checkpoint: name the file
            raise UsageError(f"{args.ckpt}: {e}") from None
        print(json.dumps({**info, **details}, indent=1))
        return 0
    if family in ("hart", "hart_tokenizer"):
        print(json.dumps({**info, **_hart_info(args, sd, family, path if path.is_dir() else path.parent)}, indent=1))
        return 0
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
    info.update(config_source=args.config or "checkpoint shapes", config={k: cfg.to_dict()[k] for k in fields})
    if kind == "VAR":
        info["matching_presets"] = matching_presets(sd)
    print(json.dumps(info, indent=1))
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``info`` on the ``ssg-engine`` subparsers."""
    p = sub.add_parser("info", help="print a checkpoint's family (VAR, VQ-VAE, Infinity, BSQ VAE, HART, HART tokenizer; a HART llm/ or tokenizer/ folder too), config (inferred from its shapes, "
                                    "or --config checked against them) and parameter count")
    p.add_argument("ckpt")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="model config JSON to check the checkpoint against and print, instead of inferring")
    g.add_argument("--patch-nums", type=patch_nums_arg, default=None, help="comma-separated scales, when the token count matches no preset")
    p.set_defaults(func=cmd_info)
