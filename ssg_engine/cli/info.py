"""``ssg-engine info``: a checkpoint's family (VAR, VQ-VAE, Infinity, BSQ VAE) and config (inferred from its shapes, or
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


def cmd_info(args: argparse.Namespace) -> int:
    """The checkpoint's family and config: from --config (checked against the shapes), else inferred; only fields that
    are known."""
    from ..checkpoints import _check_and_load
    from ..families.var.config import ModelConfig, infer_config, matching_presets
    from ..loading import FAMILY_KEYS, FAMILY_NAMES, CheckpointError, build_models, checkpoint_family, read_state_dict

    sd = read_state_dict(args.ckpt)
    family = checkpoint_family(sd)
    if family is None:
        raise UsageError(f"{args.ckpt} is not a VAR, VQ-VAE, Infinity or BSQ VAE state dict (it must hold exactly one of the keys "
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
    p = sub.add_parser("info", help="print a checkpoint's family (VAR, VQ-VAE, Infinity, BSQ VAE), config (inferred from its shapes, "
                                    "or --config checked against them) and parameter count")
    p.add_argument("ckpt")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="model config JSON to check the checkpoint against and print, instead of inferring")
    g.add_argument("--patch-nums", type=patch_nums_arg, default=None, help="comma-separated scales, when the token count matches no preset")
    p.set_defaults(func=cmd_info)
