"""Loading Infinity's public checkpoints with its BSQ VAE (``load_infinity``): upstream's files (plain, as a training
checkpoint, or safetensors) or our own saved state dicts. Reading and checking a checkpoint file is shared
(:mod:`ssg_engine.checkpoints`); ``ssg_engine.loading`` re-exports these names."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Tuple, Union

import torch

from ...checkpoints import CheckpointError, StateLike, _state
from ...validation import AssumedSettingWarning
from .model import InfinityConfig, InfinityTransformer
from .tokenizer import BSQVAE, load_bsq_vae

InfinityConfigLike = Union[None, str, InfinityConfig, Mapping[str, Any]]
# buffers of older code that upstream Infinity.load_state_dict removes from a checkpoint before loading
STALE_INFINITY_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


# InfinityConfig fields that change samples but that neither the checkpoint's shapes nor upstream's file tell: the
# released value is assumed unless the config gives them
ASSUMED_INFINITY_SETTINGS = ("fused_norm",)


def warn_assumed_settings(given: Mapping[str, Any], what: str) -> None:
    """One ``AssumedSettingWarning`` naming the ``ASSUMED_INFINITY_SETTINGS`` the ``given`` config leaves out (their
    released value is used) and how to set them."""
    assumed = {name: getattr(InfinityConfig, name) for name in ASSUMED_INFINITY_SETTINGS if name not in given}
    if assumed:
        values = ", ".join(f"{name}={value}" for name, value in assumed.items())
        other = ", ".join(f"{name!r}: {not value}" for name, value in assumed.items())
        other_json = ", ".join(f"{json.dumps(name)}: {json.dumps(not value)}" for name, value in assumed.items())
        warnings.warn(
            f"{what}: assumed {values} (the released models' value; a checkpoint's shapes cannot tell it); if the model "
            f"was trained otherwise its samples are wrong: pass config={{{other}}} (command line: --config FILE.json "
            f"holding {{{other_json}}})", AssumedSettingWarning, stacklevel=3,
        )


def load_infinity(
    model_path: StateLike,
    vae_path: StateLike,
    config: InfinityConfigLike = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tuple[InfinityTransformer, BSQVAE]:
    """Load (infinity, vae) from upstream files (``infinity_*.pth`` plain or as a training checkpoint, safetensors, or
    our own saved state dicts) or state dicts, e.g. ``infinity_2b_reg.pth`` with ``infinity_vae_d32reg.pth``.

    ``config``: None (inferred from the shapes, ``InfinityConfig.from_state_dict``), a preset name (``INFINITY_PRESETS``),
    a dict of ``InfinityConfig`` fields or upstream ``Infinity(...)`` keywords, or an ``InfinityConfig``; the bits per
    token must be the VAE's ``codebook_dim``. The model is built on the meta device, filled strictly (``load_upstream``;
    only the stale buffers upstream's own ``load_state_dict`` drops are ignored) and cast to ``dtype``; the VAE stays
    float32. Both are in eval mode.
    """
    model_state = {k: v for k, v in _state(model_path, "model_path", "infinity").items() if k not in STALE_INFINITY_BUFFERS}
    vae_state = _state(vae_path, "vae_path", "bsq_vae")
    what = str(model_path) if isinstance(model_path, (str, Path)) else "model_path"
    try:
        vae = load_bsq_vae(vae_state, device=device)
    except ValueError as e:
        raise CheckpointError(f"{vae_path if isinstance(vae_path, (str, Path)) else 'vae_path'}: {e}") from None
    d = vae.config.codebook_dim
    if isinstance(config, InfinityConfig):
        cfg = config
    elif isinstance(config, str):
        cfg = InfinityConfig.preset(config, codebook_dim=d)
    elif config is None or isinstance(config, Mapping):
        try:
            inferred = InfinityConfig.from_state_dict(model_state)
        except ValueError as e:
            raise CheckpointError(f"{what}: {e}") from None
        cfg = inferred if config is None else InfinityConfig.from_upstream(config, codebook_dim=d, base=inferred)
    else:
        raise TypeError(f"config must be None, a preset name, a dict or an InfinityConfig; got {type(config).__name__}")
    if cfg.codebook_dim != d:
        patchify = " (4 x the VAE's: spatial patchify, as Infinity-8B; not supported)" if cfg.codebook_dim == 4 * d else ""
        raise CheckpointError(f"{what} predicts {cfg.codebook_dim} bits per token{patchify} but the VAE has codebook_dim {d}; "
                              "give the VAE the model was trained with (infinity_2b_reg.pth: infinity_vae_d32reg.pth)")
    with torch.device("meta"):
        model = InfinityTransformer(cfg)
    model.to_empty(device=device)  # every parameter and buffer is in the strictly checked state dict
    try:
        model.load_upstream(model_state)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if config is None or isinstance(config, Mapping):  # said once the model has loaded
        warn_assumed_settings(config or {}, what)
    return model.to(dtype=dtype).eval().requires_grad_(False), vae
